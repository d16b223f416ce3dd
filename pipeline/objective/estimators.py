"""Mutual-information lower bounds on critic scores: pure tensor maths, torch only.

Every estimator returns the value to *maximise*, in nats. Scores are the critic's
outputs T(a, b): ``pos`` on pairs drawn from the joint p(a, b), ``neg`` on pairs drawn
from the product of marginals p(a) p(b).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "clip_scores",
    "derangement",
    "dv",
    "gaussian_kl",
    "infonce",
    "infonce_shared_negatives",
    "jsd",
    "jsd_to_nats",
]

LOG4 = math.log(4.0)


def jsd(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon bound E_pos[-softplus(-T)] - E_neg[softplus(T)].

    This is the vanilla-GAN discriminator value (binary cross-entropy with logits,
    negated). Its maximum over critics is 2 * JSD(p(a,b) || p(a)p(b)) - log 4, so it
    lies in [-log 4, 0]; ``jsd_to_nats`` maps it to the divergence itself.
    """
    return -F.softplus(-pos).mean() - F.softplus(neg).mean()


def jsd_to_nats(value: torch.Tensor) -> torch.Tensor:
    """Turn the ``jsd`` bound into the Jensen-Shannon divergence in nats, in [0, log 2]."""
    return (value + LOG4) / 2


def dv(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan bound E_pos[T] - log E_neg[exp(T)] (MINE).

    The log-mean-exp is taken with ``logsumexp`` so large scores cannot overflow.
    """
    neg = neg.reshape(-1)
    log_mean_exp = torch.logsumexp(neg, dim=0) - math.log(neg.numel())
    return pos.mean() - log_mean_exp


def infonce(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """infoNCE estimate mean_i(T[i, t_i] - logsumexp_j T[i, j]) + log M, in nats.

    ``scores`` is (N, M): row i scores one query against M candidates, of which column
    ``targets[i]`` is its positive. Each term is a log-softmax, so the estimate is at
    most log M whatever the scores.
    """
    if scores.dim() != 2:
        raise ValueError(f"infonce expects scores of shape (N, M), got {tuple(scores.shape)}")
    log_prob = scores.gather(1, targets.view(-1, 1)).squeeze(1) - torch.logsumexp(scores, dim=1)
    return log_prob.mean() + math.log(scores.shape[1])


def infonce_shared_negatives(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """infoNCE where the K positives of a row share that row's R negatives.

    ``pos`` is (N, K), ``neg`` is (N, R). Positive (n, k) competes with itself and the
    R negatives of row n: the value equals ``infonce`` on the N*K rows
    [pos[n, k], neg[n, :]], with M = R + 1, without building those rows. This is the
    local DIM objective: each location's feature is the positive, every location of
    every other image is a negative.
    """
    neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)  # (N, 1)
    log_prob = pos - torch.logaddexp(pos, neg_lse)
    return log_prob.mean() + math.log(neg.shape[1] + 1)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample, summed over the last dim."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=-1)


def clip_scores(scores: torch.Tensor, tclip: float) -> torch.Tensor:
    """Soft-clip scores to (-tclip, tclip) with tclip * tanh(s / tclip) (AMDIM).

    Bounded scores keep the log-sum-exp of infoNCE and DV from being driven by a few
    runaway negatives early in training. ``tclip <= 0`` disables clipping.
    """
    if tclip <= 0:
        return scores
    return tclip * torch.tanh(scores / tclip)


def derangement(
    n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """A random permutation with no fixed point: ``perm[i] != i`` for every i.

    Built as a uniformly random n-cycle: shuffle the indices, then send each to the
    next one in the shuffled order. Used to pick, for each image, another image of the
    same batch as its negative.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm.to(device) if device is not None else perm
