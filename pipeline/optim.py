"""Optimizers and the learning-rate schedule: AdamW or LARS, linear warmup then cosine.

Biases and normalisation parameters (every parameter with fewer than two dimensions)
get no weight decay and, under LARS, no trust-ratio scaling: they are few, and scaling
them by their own tiny norm destabilises large-batch training (You et al., 2017).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import choose

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["LARS", "OPTIMIZERS", "build_optimizer", "build_scheduler", "lr_factor", "param_groups"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step is scaled per tensor by a trust ratio.

    For a parameter w with gradient g (weight decay folded in: g + wd * w), the local
    rate is ``trust * ||w|| / ||g||``, so each layer moves by a fixed fraction of its
    own norm whatever the batch size. Groups with ``lars=False`` (biases, norms) take a
    plain momentum-SGD step.
    """

    def __init__(
        self,
        params,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust: float = 1e-3,
        eps: float = 1e-8,
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust": trust,
            "eps": eps,
            "lars": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, g_norm = p.norm(), g.norm()
                    ratio = group["trust"] * w_norm / (g_norm + group["eps"])
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    g = g.mul(ratio)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases/norm params (neither)."""
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else plain).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": plain, "weight_decay": 0.0, "lars": False},
    ]


def _adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    for g in groups:  # AdamW does not know the "lars" key; it would just carry it along
        g.pop("lars")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def _lars(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    return LARS(groups, lr=cfg.lr)


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
    warmup = min(cfg.warmup_steps, max(0, cfg.max_steps - 1))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, cfg.max_steps)
    )
