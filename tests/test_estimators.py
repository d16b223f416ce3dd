"""Estimators against hand-computed values and closed forms."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pipeline.objective.estimators import (
    clip_scores,
    derangement,
    dv,
    gaussian_kl,
    infonce,
    infonce_shared_negatives,
    jsd,
    jsd_to_nats,
)


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(16, 10) * 2, torch.randn(16, 10)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    assert gaussian_kl(mu, logvar).shape == (16,)
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected)
    assert torch.allclose(gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)), torch.zeros(3))


def test_jsd_hand_computed():
    pos = torch.tensor([0.0, math.log(3.0)])
    neg = torch.tensor([0.0, -math.log(3.0)])
    # -softplus(-0) = -log 2, -softplus(-log 3) = -log 4/3;
    # softplus(0) = log 2, softplus(-log 3) = log 4/3
    expected = -(math.log(2.0) + math.log(4.0 / 3.0))
    assert jsd(pos, neg).item() == pytest.approx(expected, abs=1e-6)
    # a perfect critic reaches the maximum 0, i.e. JSD = log 2; a constant critic gives 0 nats
    assert jsd_to_nats(jsd(torch.tensor([50.0]), torch.tensor([-50.0]))).item() == pytest.approx(
        math.log(2), abs=1e-6
    )
    assert jsd_to_nats(jsd(torch.zeros(4), torch.zeros(4))).item() == pytest.approx(0.0, abs=1e-6)


def test_dv_hand_computed_and_stable():
    pos, neg = torch.tensor([1.0, 3.0]), torch.tensor([0.0, math.log(3.0)])
    assert dv(pos, neg).item() == pytest.approx(2.0 - math.log(2.0), abs=1e-6)
    huge = dv(torch.tensor([1001.0]), torch.tensor([1000.0, 1000.0]))
    assert torch.isfinite(huge) and huge.item() == pytest.approx(1.0, abs=1e-4)


def test_infonce_hand_computed():
    scores = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    expected = 2.0 - math.log(math.exp(2.0) + 1.0) + math.log(2.0)
    assert infonce(scores, torch.tensor([0, 1])).item() == pytest.approx(expected, abs=1e-6)
    # the positive column is whatever the targets say
    assert infonce(scores, torch.tensor([1, 0])).item() == pytest.approx(
        0.0 - math.log(math.exp(2.0) + 1.0) + math.log(2.0), abs=1e-6
    )


@pytest.mark.parametrize("m", [2, 7, 64])
def test_infonce_never_exceeds_log_m(m):
    torch.manual_seed(m)
    targets = torch.arange(m) % m
    for scale in (1.0, 10.0, 1e4):
        scores = torch.randn(m, m) * scale
        scores[torch.arange(m), targets] += 3 * scale  # a critic as confident as it gets
        value = infonce(scores, targets).item()
        assert value <= math.log(m) + 1e-6
    assert infonce(torch.zeros(m, m), targets).item() == pytest.approx(0.0, abs=1e-6)


def test_infonce_shared_negatives_equals_explicit_rows():
    torch.manual_seed(1)
    pos, neg = torch.randn(3, 5), torch.randn(3, 7)
    rows = torch.cat([pos.reshape(-1, 1), neg.repeat_interleave(5, dim=0)], dim=1)  # (15, 8)
    expected = infonce(rows, torch.zeros(15, dtype=torch.long))
    torch.testing.assert_close(infonce_shared_negatives(pos, neg), expected)


@pytest.mark.parametrize("n", [2, 3, 5, 64, 257])
def test_derangement_has_no_fixed_point(n):
    for seed in range(20):
        perm = derangement(n, generator=torch.Generator().manual_seed(seed))
        assert sorted(perm.tolist()) == list(range(n))
        assert not (perm == torch.arange(n)).any()


def test_derangement_is_random_and_reproducible():
    draw = lambda s: derangement(32, generator=torch.Generator().manual_seed(s)).tolist()  # noqa: E731
    assert draw(0) == draw(0)
    assert len({tuple(draw(s)) for s in range(10)}) == 10
    with pytest.raises(ValueError):
        derangement(1)


def test_clip_scores():
    s = torch.tensor([-1e6, -1.0, 0.0, 0.5, 1e6])
    clipped = clip_scores(s, 10.0)
    assert clipped.abs().max() <= 10.0
    assert clipped[2] == 0 and clipped[3].item() == pytest.approx(0.5, abs=1e-3)
    assert torch.equal(clip_scores(s, 0.0), s)
