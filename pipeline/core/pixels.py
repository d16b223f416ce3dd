"""How pixels become model inputs, on every path: [0, 1] -> [-1, 1], mean 0.5 and std 0.5
per channel. Training augmentation (per image and batched), evaluation, the digits tensor
and the exported model's timm config (what timm's own transforms then apply) read it here."""

from __future__ import annotations

import torch

__all__ = ["MEAN", "STD", "normalize"]

MEAN = 0.5
STD = 0.5


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Images scaled to [0, 1] -> model inputs in [-1, 1] (a new tensor)."""
    return x.sub(MEAN).div_(STD)
