"""The DIM objective: pairs and negatives -> critic scores -> MI estimates -> loss.

    L = -alpha * I_global - beta * mean_ij I_local + gamma * E[KL(N(mu, sigma^2) || N(0, I))]

Where each estimator draws its negatives (set by the estimator; no other setting changes it):

- ``jsd``: local negatives. One random derangement of the device batch pairs every
  code with another image of the same batch; nothing crosses devices.
- ``dv``: every other image of the device batch is a negative (all off-diagonal pairs,
  masked exactly); the log-mean-exp wants many negatives.
- ``infonce``: cross-device negatives. The image-side critic embeddings are gathered
  from all ranks with gradient; each rank scores its own codes against the global
  batch (B_local x B_global, positives at columns offset by the rank). Locally, every
  location of every other image is a negative for each (location, code) positive.

An ``Estimator`` keeps the two steps apart: ``pool`` (the image side a rank's codes are
scored against: its own batch, or the gathered global one) and ``bound``. The objective
pools each view once, however many (code, view) pairs it scores against it.

Gradient scale under DDP / DeepSpeed: each rank's loss is the mean over *its own*
rows, so the global loss is the average of the rank losses. The gather's backward sums
every rank's gradient into the owner's features, and DDP (or DeepSpeed) then averages
parameter gradients over ranks: (1/P) * sum_r dL_r/dtheta, exactly the gradient of the
single-process loss on the whole batch. Do not multiply by the world size: nothing is
missing (a gather whose backward kept only the local slice would lose the other ranks'
terms, and no rescaling restores those), and do not compute the full B_global x B_global
matrix on every rank (P times the work and B_global^2 memory for the same gradient).
tests/test_distributed.py checks this on two real processes; docs/distributed.md derives it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from pipeline.core.errors import choose
from pipeline.core.schema import LossConfig
from pipeline.models.encoder import EncoderOutput
from pipeline.objective import estimators as est
from pipeline.objective.critics import CRITICS, Critic
from pipeline.objective.distributed import gather_with_grad, rank

__all__ = [
    "ESTIMATORS",
    "GLOBAL_INPUTS",
    "DIMObjective",
    "Estimate",
    "Estimator",
    "GlobalInput",
    "build_critic",
    "mi_estimate",
    "sample_locations",
    "view_pairs",
]


def _diagonal(scores: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split pairwise scores (N, M[, L]) into positives at [i, offset + i] and the rest.

    Returns positives (N[, L]) and negatives (N, M - 1[, L]); the positive is removed by
    a boolean mask, so it never leaks into the negatives.
    """
    n, m = scores.shape[:2]
    rows = torch.arange(n, device=scores.device)
    keep = torch.ones(n, m, dtype=torch.bool, device=scores.device)
    keep[rows, rows + offset] = False
    pos = scores[rows, rows + offset]
    neg = scores[keep].reshape(n, m - 1, *scores.shape[2:])
    return pos, neg


class Estimate(NamedTuple):
    bound: torch.Tensor  # the value to maximise (differentiable)
    nats: torch.Tensor  # the MI estimate in nats (for JSD, the JS divergence in [0, log 2])
    score_sq: torch.Tensor  # mean(score^2) of the raw scores, for the score penalty
    clipped: torch.Tensor  # fraction of raw scores beyond +-tclip (where the soft clip bites)


def _stats(raw: torch.Tensor, tclip: float) -> tuple[torch.Tensor, torch.Tensor]:
    clipped = (raw.detach().abs() > tclip).float().mean() if tclip > 0 else raw.new_zeros(())
    return raw.pow(2).mean(), clipped


def _jsd(critic: Critic, ea, eb, tclip: float, generator) -> Estimate:
    """Local negatives: one derangement of the device batch."""
    perm = est.derangement(ea.shape[0], generator=generator, device=ea.device)
    raw = torch.stack([critic.aligned(ea, eb), critic.aligned(ea[perm], eb)])
    pos, neg = est.clip_scores(raw, tclip)
    bound = est.jsd(pos, neg)
    return Estimate(bound, est.jsd_to_nats(bound.detach()), *_stats(raw, tclip))


def _dv(critic: Critic, ea, eb, tclip: float, generator) -> Estimate:
    """Every other image of the device batch is a negative."""
    raw = critic.pairwise(ea, eb)
    pos, neg = _diagonal(est.clip_scores(raw, tclip))
    bound = est.dv(pos, neg)
    return Estimate(bound, bound.detach(), *_stats(raw, tclip))


def _infonce(critic: Critic, ea_all, eb, tclip: float, generator) -> Estimate:
    """Cross-device negatives: ``ea_all`` is every rank's image side, in rank order."""
    offset = rank() * eb.shape[0]
    raw = critic.pairwise(ea_all, eb)  # (B_local, B_global[, L])
    scores = est.clip_scores(raw, tclip)
    if critic.local:
        pos, neg = _diagonal(scores, offset)
        bound = est.infonce_shared_negatives(pos, neg.flatten(1))
    else:
        targets = torch.arange(eb.shape[0], device=eb.device) + offset
        bound = est.infonce(scores, targets)
    return Estimate(bound, bound.detach(), *_stats(raw, tclip))


def _device_batch(ea: torch.Tensor) -> torch.Tensor:
    return ea


def _all_ranks(ea: torch.Tensor) -> torch.Tensor:
    return gather_with_grad(ea)  # looked up at call time: tests swap the gather


class Estimator(NamedTuple):
    """One ``loss.estimator``: where its negatives come from, then its bound."""

    pool: Callable[[torch.Tensor], torch.Tensor]  # image-side embeddings -> what codes meet
    bound: Callable[..., Estimate]  # (critic, pooled image side, codes, tclip, generator)


ESTIMATORS: dict[str, Estimator] = {
    "jsd": Estimator(_device_batch, _jsd),
    "dv": Estimator(_device_batch, _dv),
    "infonce": Estimator(_all_ranks, _infonce),
}


def mi_estimate(
    estimator: str,
    critic: Critic,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    tclip: float = 0.0,
    generator: torch.Generator | None = None,
) -> Estimate:
    """Estimate I(a; b) from aligned samples (a_i, b_i) of the joint."""
    chosen = choose("loss.estimator", estimator, ESTIMATORS)
    pooled = chosen.pool(critic.embed_a(a))
    return chosen.bound(critic, pooled, critic.embed_b(b), tclip, generator)


def sample_locations(
    local: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``k`` locations of each image's map (N, C, H, W), drawn without replacement and
    independently per image, as a (N, C, k, 1) map; ``k`` = 0 or >= H*W keeps them all.
    The local critic's cost grows with the locations it scores; the encoder's does not."""
    n, c = local.shape[:2]
    flat = local.flatten(2)
    if k <= 0 or k >= flat.shape[2]:
        return local
    noise = torch.rand(n, flat.shape[2], generator=generator, device=local.device)
    index = noise.argsort(dim=1)[:, :k]
    return flat.gather(2, index[:, None, :].expand(n, c, k)).unsqueeze(-1)


def view_pairs(count: int) -> list[tuple[int, int]]:
    """(code view, image-side view) pairs the objective scores: one view against itself;
    several, each code against every *other* view (count * (count - 1) pairs)."""
    if count == 1:
        return [(0, 0)]
    return [(c, i) for c in range(count) for i in range(count) if i != c]


class GlobalInput(NamedTuple):
    """What the global critic pairs with the code z: its width and how to take it."""

    width: Callable[[int, int], int]  # (local map channels, code_dim) -> width
    take: Callable[[EncoderOutput], torch.Tensor]


def _code_mean(out: EncoderOutput) -> torch.Tensor:
    return out.mu


def _pooled_local_map(out: EncoderOutput) -> torch.Tensor:
    return out.local.mean(dim=(2, 3))


# loss.global_input. "mu": the code's mean stands in for the image; mu rather than a
# second copy of z, because I(z; z) is infinite while I(mu(x); z) is the I(x; z) the
# encoder controls. "pooled": the local map's spatial mean.
GLOBAL_INPUTS = {
    "mu": GlobalInput(lambda channels, code_dim: code_dim, _code_mean),
    "pooled": GlobalInput(lambda channels, code_dim: channels, _pooled_local_map),
}


def build_critic(kind: str, a_dim: int, b_dim: int, cfg: LossConfig, local: bool) -> Critic | None:
    """The critic ``kind`` names (``CRITICS``), or None for ``"none"``."""
    if kind == "none":
        return None
    scope = "local" if local else "global"
    return choose(f"loss.{scope}_critic", kind, CRITICS).build(a_dim, b_dim, cfg, local)


class DIMObjective(nn.Module):
    """Holds the critics; ``forward(encoder_output) -> (loss, terms)``.

    The global critic pairs (``GLOBAL_INPUTS[cfg.global_input]`` of x', z_x); local
    critics pair (C_ij(x'), z_x).
    """

    def __init__(self, cfg: LossConfig, local_channels: int, code_dim: int):
        super().__init__()
        self.cfg = cfg
        source = choose("loss.global_input", cfg.global_input, GLOBAL_INPUTS)
        self._global_input = source.take
        a_dim = source.width(local_channels, code_dim)
        self.global_critic = build_critic(cfg.global_critic, a_dim, code_dim, cfg, local=False)
        self.local_critic = build_critic(
            cfg.local_critic, local_channels, code_dim, cfg, local=True
        )

    def forward(
        self, *views: EncoderOutput, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and logged terms of one or more encodings of the same images.

        Several views (independently augmented, AMDIM): the code of each view is scored
        against the features of every *other* view, and every term is the mean over
        those ordered pairs: a code can only win by predicting what survives
        augmentation, not the colour statistics its own view shares with its own local
        features. One view: its code against its own features, as in DIM.
        """
        cfg = self.cfg
        estimator = choose("loss.estimator", cfg.estimator, ESTIMATORS)
        pairs = view_pairs(len(views))
        kl = sum(est.gaussian_kl(v.mu.float(), v.logvar.float()).mean() for v in views)
        kl = kl / len(views)
        loss = cfg.gamma * kl
        terms = {"kl": kl.detach(), "loss/kl": (cfg.gamma * kl).detach()}
        score_sq = torch.zeros((), device=kl.device)
        for scope, critic, weight, image_side in (
            ("global", self.global_critic, cfg.alpha, self._global_input),
            (
                "local",
                self.local_critic,
                cfg.beta,
                lambda view: sample_locations(view.local, cfg.local_positions, generator),
            ),
        ):
            if critic is None:
                continue
            # Each view is embedded (and gathered) once, however many pairs it is in.
            images = [estimator.pool(critic.embed_a(image_side(v).float())) for v in views]
            codes = [critic.embed_b(v.z.float()) for v in views]
            parts = [
                estimator.bound(critic, images[i], codes[c], cfg.tclip, generator) for c, i in pairs
            ]
            share = 1.0 / len(parts)
            bound = sum(p.bound for p in parts) * share
            loss = loss - weight * bound
            score_sq = score_sq + sum(p.score_sq for p in parts) * share
            terms[f"mi/{scope}/{cfg.estimator}"] = sum(p.nats for p in parts) * share
            terms[f"clip_frac/{scope}"] = sum(p.clipped for p in parts) * share
            terms[f"loss/{scope}"] = (-weight * bound).detach()
        if cfg.score_penalty > 0:
            loss = loss + cfg.score_penalty * score_sq
            terms["loss/score_penalty"] = (cfg.score_penalty * score_sq).detach()
        terms["score_sq"] = score_sq.detach()
        terms["loss"] = loss.detach()
        return loss, terms
