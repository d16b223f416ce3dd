"""Each estimator, with a small trained critic, against the known MI of correlated Gaussians.

x ~ N(0, I_d), y = rho x + sqrt(1 - rho^2) eps: I(x; y) = -d/2 log(1 - rho^2) nats.
The log density ratio r(x, y) = log p(x, y) / (p(x) p(y)) is known in closed form, so
the true Jensen-Shannon divergence can be computed by Monte Carlo too.
"""

import math

import pytest
import torch

from pipeline.objective.critics import ConcatCritic
from pipeline.objective.estimators import infonce, jsd_to_nats
from pipeline.objective.loss import mi_estimate

D, RHO = 2, 0.8
TRUE_MI = -D / 2 * math.log(1 - RHO**2)  # 1.022 nats


def sample(n, gen):
    x = torch.randn(n, D, generator=gen)
    y = RHO * x + math.sqrt(1 - RHO**2) * torch.randn(n, D, generator=gen)
    return x, y


def log_ratio(x, y):
    s2 = 1 - RHO**2
    return (-0.5 * math.log(s2) - (y - RHO * x).pow(2) / (2 * s2) + y.pow(2) / 2).sum(-1)


def true_jsd(n=400_000):
    gen = torch.Generator().manual_seed(123)
    x, y = sample(n, gen)
    r_joint = log_ratio(x, y)
    r_prod = log_ratio(x, y[torch.randperm(n, generator=gen)])
    # JSD = 1/2 E_p[log 2p/(p+q)] + 1/2 E_q[log 2q/(p+q)] with p/q = exp(r)
    return 0.5 * (math.log(2) - torch.nn.functional.softplus(-r_joint).mean().item()) + 0.5 * (
        math.log(2) - torch.nn.functional.softplus(r_prod).mean().item()
    )


def train_critic(estimator, steps, batch, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    critic = ConcatCritic(D, D, hidden=64)
    opt = torch.optim.Adam(critic.parameters(), lr=2e-3)
    for _ in range(steps):
        x, y = sample(batch, gen)
        bound = mi_estimate(estimator, critic, x, y, generator=gen).bound
        opt.zero_grad()
        (-bound).backward()
        opt.step()
    return critic, gen


def evaluate(estimator, critic, gen, batch, repeats):
    with torch.no_grad():
        return (
            sum(
                mi_estimate(estimator, critic, *sample(batch, gen), generator=gen).nats.item()
                for _ in range(repeats)
            )
            / repeats
        )


def test_infonce_reaches_min_of_mi_and_log_m():
    batch = 128
    critic, gen = train_critic("infonce", steps=600, batch=batch)
    estimate = evaluate("infonce", critic, gen, batch, repeats=20)
    target = min(TRUE_MI, math.log(batch))
    assert estimate <= math.log(batch)
    assert abs(estimate - target) < 0.12, (estimate, target)


def test_infonce_saturates_at_log_m_when_mi_is_larger():
    """I = 8.3 nats but only M = 16 candidates: the estimate stops just under log 16,
    as the oracle critic (the true log density ratio) does."""
    global D, RHO
    old, (D, RHO) = (D, RHO), (10, 0.9)
    try:
        mi, m = -D / 2 * math.log(1 - RHO**2), 16
        critic, gen = train_critic("infonce", steps=500, batch=m)
        estimate = evaluate("infonce", critic, gen, m, repeats=300)
        scores = []
        for _ in range(300):
            x, y = sample(m, gen)
            oracle = log_ratio(x[None, :, :], y[:, None, :])  # [i, j] = r(x_j, y_i)
            scores.append(infonce(oracle, torch.arange(m)).item())
        oracle_value = sum(scores) / len(scores)
        assert mi > math.log(m) > oracle_value > math.log(m) - 0.3
        assert estimate <= math.log(m)
        assert abs(estimate - oracle_value) < 0.15, (estimate, oracle_value)
    finally:
        D, RHO = old


def test_dv_close_to_true_mi_and_below_it():
    batch = 256
    critic, gen = train_critic("dv", steps=600, batch=batch)
    estimate = evaluate("dv", critic, gen, batch, repeats=20)
    assert abs(estimate - TRUE_MI) < 0.15, estimate
    assert estimate < TRUE_MI + 0.05  # a lower bound, up to Monte Carlo noise


def test_jsd_close_to_true_jsd_and_its_critic_recovers_the_mi():
    batch = 256
    critic, gen = train_critic("jsd", steps=800, batch=batch)
    estimate = evaluate("jsd", critic, gen, batch, repeats=40)
    truth = true_jsd()
    assert 0 < truth < math.log(2)
    assert abs(estimate - truth) < 0.03, (estimate, truth)
    assert estimate < truth + 0.01
    # the optimal JSD critic is the log density ratio, so E_joint[T] estimates I(x; y)
    with torch.no_grad():
        x, y = sample(20_000, gen)
        ratio_mi = critic.aligned(critic.embed_a(x), critic.embed_b(y)).mean().item()
    assert abs(ratio_mi - TRUE_MI) < 0.2, ratio_mi


def test_jsd_to_nats_is_bounded_by_log2():
    assert jsd_to_nats(torch.tensor(0.0)).item() == pytest.approx(math.log(2))
