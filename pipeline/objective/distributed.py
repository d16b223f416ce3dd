"""Rank helpers and the differentiable all-gather behind cross-device negatives."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.nn.functional as dist_fn

__all__ = ["gather_with_grad", "is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` along dim 0 in rank order, keeping the autograd graph.

    The backward pass of torch's autograd all-gather sums, over all ranks, the gradient
    that each rank's loss sends to a slice, and hands the sum to the slice's owner. So a
    rank's features get the gradient of *every* rank's loss, as they would on one
    process holding the whole batch. Every rank must pass the same shape.
    Identity when not distributed.
    """
    if not is_distributed():
        return x
    if _ALL_GATHER is None:  # a torch older than the functional all-gather with a backward
        return torch.cat([_ContiguousGrad.apply(t) for t in dist_fn.all_gather(x)], dim=0)
    # .wait(): a plain tensor, not the collective's lazily waiting wrapper
    return _ALL_GATHER(x.contiguous(), 0, dist.group.WORLD).wait()


# What torch recommends since it deprecated torch.distributed.nn.functional.all_gather:
# one (world * n, ...) tensor whose backward reduce-scatters (sums) the ranks' gradients;
# gloo's reduce-scatter does not scramble permuted gradients as the old backward did.
_ALL_GATHER = getattr(funcol, "all_gather_single_autograd", None)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    On gloo, the all-gather's backward scatters into ``empty_like(grad)``; for a dense but
    permuted gradient (e.g. from the local critic's einsum) that buffer is permuted too,
    and gloo's scatter fills it as if it were contiguous: scrambled gradients
    (pytorch/pytorch#192920). ``tests/test_distributed.py`` catches it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()
