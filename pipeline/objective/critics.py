"""Critics T(a, b): the discriminators whose scores feed the MI estimators.

Every critic is split into a per-sample embedding of each side and a cheap combine
step, so the same module scores aligned pairs (a_i, b_i), shuffled pairs, and all
pairs of a batch (or of a batch gathered across devices) without recomputing the
embeddings. ``a`` is the image side (features of x, or a second view of its code),
``b`` is the code z. Local critics take a map (N, C, H, W) on the image side and score
each of its H*W locations, with the critic's linear layers applied to the map as 1x1
convolutions (no transposed copy of the map, forward or backward).

- ``ConcatCritic``: an MLP on the concatenation [a, b] (1x1 convolutions when local).
  Its first linear layer is split as W [a; b] = W_a a + W_b b, so all-pairs scoring adds
  two embeddings instead of concatenating every pair.
- ``DotCritic``: separable T(a, b) = f(a) . g(b) / sqrt(D): all pairs are one matrix
  product, which is what makes cross-device infoNCE cheap. With a temperature t > 0 it
  scores cos(f(a), g(b)) / t instead (SimCLR's normalised form), bounded by 1 / t.

``CRITICS`` names them for ``loss.global_critic`` / ``loss.local_critic``; ``build``
reads the widths each one uses from the loss config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.schema import LossConfig

__all__ = ["CRITICS", "ConcatCritic", "Critic", "DotCritic", "per_location"]


def per_location(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear`` on vectors (N, C) -> (N, D), or on every location of a map
    (N, C, H, W) -> (N, D, H, W) as a 1x1 convolution: the same weights, but the map
    stays in its own layout, where flattening it to (N*H*W, C) rows would copy it."""
    if x.dim() == 2:
        return linear(x)
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


class Critic(nn.Module):
    """Interface: ``embed_a``/``embed_b`` per sample, ``aligned``/``pairwise`` to score."""

    local: bool
    needs_hidden: bool = False  # True: an MLP that cannot work with loss.critic_hidden=0
    takes_temperature: bool = False  # True: loss.critic_temperature sets its scores

    @classmethod
    def build(cls, a_dim: int, b_dim: int, cfg: LossConfig, local: bool) -> Critic:
        """The critic for inputs of widths ``a_dim`` and ``b_dim`` as ``cfg`` sizes it."""
        raise NotImplementedError

    def embed_a(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_b(self, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aligned(self, ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
        """T(a_i, b_i): (N,) for global critics, (N, L) for local ones."""
        raise NotImplementedError

    def pairwise(self, ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
        """T(a_j, b_i) at [i, j]: (N_b, N_a), or (N_b, N_a, L) for local critics."""
        raise NotImplementedError


class _ResidualMLP(nn.Module):
    """Two-layer MLP plus a linear shortcut (the DIM/AMDIM embedding block); with
    ``hidden=0`` the shortcut alone, a linear embedding: on a local map it runs on every
    location, so it is most of the critic's cost, and this is the cheapest form."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.block = (
            nn.Sequential(
                nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
            )
            if hidden
            else None
        )
        self.shortcut = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, out), or (N, in, H, W) -> (N, out, H, W) location by location."""
        out = per_location(self.shortcut, x)
        if self.block is None:
            return out
        first, relu, second = self.block
        return per_location(second, relu(per_location(first, x))) + out


class DotCritic(Critic):
    """T(a, b) = f(a) . g(b) / sqrt(dim); f and g are residual MLPs (1x1 convs if local).
    With ``temperature`` t > 0: T(a, b) = cos(f(a), g(b)) / t, so no score can run away
    and the soft clip and score penalty have nothing left to hold back.

    Local embeddings of the image side are (N, dim, L); the scale (1 / sqrt(dim) or
    1 / t) goes on the code's embedding, N vectors instead of N * L.
    """

    takes_temperature = True

    def __init__(
        self,
        a_dim: int,
        b_dim: int,
        dim: int = 256,
        hidden: int = 512,
        local: bool = False,
        temperature: float = 0.0,
    ):
        super().__init__()
        self.local = local
        self.f = _ResidualMLP(a_dim, dim, hidden)
        self.g = _ResidualMLP(b_dim, dim, hidden)
        self.cosine = temperature > 0
        self.scale = 1.0 / temperature if self.cosine else 1.0 / math.sqrt(dim)

    @classmethod
    def build(cls, a_dim: int, b_dim: int, cfg: LossConfig, local: bool) -> DotCritic:
        return cls(
            a_dim,
            b_dim,
            cfg.critic_dim,
            cfg.critic_hidden,
            local=local,
            temperature=cfg.critic_temperature,
        )

    def embed_a(self, a: torch.Tensor) -> torch.Tensor:
        """(N, dim), or (N, dim, L) for a map; unit length along dim if cosine."""
        e = self.f(a)
        e = F.normalize(e, dim=1) if self.cosine else e
        return e.flatten(2) if self.local else e

    def embed_b(self, b: torch.Tensor) -> torch.Tensor:
        e = self.g(b)
        return (F.normalize(e, dim=1) if self.cosine else e) * self.scale

    def aligned(self, ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
        if self.local:
            return torch.einsum("ndl,nd->nl", ea, eb)
        return (ea * eb).sum(-1)

    def pairwise(self, ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
        if self.local:
            return torch.einsum("jdl,id->ijl", ea, eb)
        return eb @ ea.t()


class ConcatCritic(Critic):
    """MLP on [a, b]: Linear-ReLU-Linear-ReLU-Linear(1), applied per location if local."""

    needs_hidden = True

    def __init__(self, a_dim: int, b_dim: int, hidden: int = 512, local: bool = False):
        super().__init__()
        self.local = local
        self.first_a = nn.Linear(a_dim, hidden, bias=False)
        self.first_b = nn.Linear(b_dim, hidden)
        self.rest = nn.Sequential(
            nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    @classmethod
    def build(cls, a_dim: int, b_dim: int, cfg: LossConfig, local: bool) -> ConcatCritic:
        return cls(a_dim, b_dim, cfg.critic_hidden, local=local)

    def embed_a(self, a: torch.Tensor) -> torch.Tensor:
        """(N, hidden), or (N, L, hidden) for a map: the rest of the MLP works on the last dim."""
        e = per_location(self.first_a, a)
        return e.flatten(2).transpose(1, 2) if self.local else e

    def embed_b(self, b: torch.Tensor) -> torch.Tensor:
        return self.first_b(b)

    def aligned(self, ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
        eb = eb.unsqueeze(1) if self.local else eb
        return self.rest(ea + eb).squeeze(-1)

    def pairwise(self, ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
        eb = eb[:, None, None, :] if self.local else eb[:, None, :]
        return self.rest(ea.unsqueeze(0) + eb).squeeze(-1)


CRITICS: dict[str, type[Critic]] = {"concat": ConcatCritic, "dot": DotCritic}
