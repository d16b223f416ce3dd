"""Optimizers and the learning-rate schedule: AdamW or LARS, linear warmup then cosine.

Parameter groups are timm's ``param_groups_weight_decay``: weights are decayed, biases
and normalisation parameters (1-d tensors and ``.bias``) are not. timm's ``Lars``
applies the trust ratio only where weight decay applies, so biases and norms also take
a plain momentum-SGD step: they are few, and scaling them by their own tiny norm
destabilises large-batch training (You et al., 2017). For a decayed weight w with
gradient g the step is ``lr * trust * ||w|| / (||g|| + wd ||w||) * (g + wd w)``
(before momentum), so each layer moves by a fixed fraction of its own norm whatever the
batch size.
"""

from __future__ import annotations

import math

import torch
from timm.optim import Lars, param_groups_weight_decay
from torch import nn

from pipeline.core.errors import choose
from pipeline.core.schema import TrainConfig

__all__ = ["OPTIMIZERS", "build_optimizer", "build_scheduler", "lr_factor", "param_groups"]

LARS_MOMENTUM = 0.9
LARS_TRUST = 1e-3


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's groups (no decay on norms and biases), the decayed one first."""
    groups = param_groups_weight_decay(model, weight_decay)
    return sorted(groups, key=lambda g: g["weight_decay"] == 0)


def _adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def _lars(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    return Lars(groups, lr=cfg.lr, momentum=LARS_MOMENTUM, trust_coeff=LARS_TRUST)


# train.optimizer: name -> f(parameter groups, train config)
OPTIMIZERS = {"adamw": _adamw, "lars": _lars}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    make = choose("train.optimizer", cfg.optimizer, OPTIMIZERS)
    return make(param_groups(model, cfg.weight_decay), cfg)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the base rate: linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """Warmup then cosine to ``cfg.max_steps``, read at every step: a time budget that
    re-plans the run's length (``pipeline.train.budget``) moves the cosine's end with it."""
    warmup = min(cfg.warmup_steps, max(0, cfg.max_steps - 1))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, cfg.max_steps)
    )
