"""Optimizers and the schedule: warmup then cosine; timm's Lars and parameter groups,
pinned: which parameters are decayed / LARS-adapted, and one step by hand."""

from __future__ import annotations

import math

import pytest
import torch
from timm.optim import Lars
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.core.schema import TrainConfig
from pipeline.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_warmup_then_cosine():
    assert lr_factor(0, 10, 100) == 0.1 and lr_factor(9, 10, 100) == 1.0
    assert lr_factor(10, 10, 100) == 1.0
    assert math.isclose(lr_factor(55, 10, 100), 0.5, abs_tol=1e-9)
    assert lr_factor(100, 10, 100) == 0.0


def test_scheduler_follows_factor():
    model = nn.Linear(3, 3)
    cfg = TrainConfig(lr=1.0, warmup_steps=2, max_steps=10)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(10):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen[:3] == [0.5, 1.0, 1.0] and seen[-1] < 0.05


def test_groups_exclude_biases_and_norms():
    """Decayed (and, under LARS, adapted): the conv and linear weights; not: biases and
    BatchNorm's weight and bias. The decayed group comes first, as in checkpoints saved
    with the earlier hand-made groups."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    decay, plain = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in decay["params"]] == ["0.weight", "3.weight"]
    assert decay["weight_decay"] == 0.1
    assert [names[id(p)] for p in plain["params"]] == ["0.bias", "1.weight", "1.bias", "3.bias"]
    assert plain["weight_decay"] == 0.0


def lars_step() -> nn.Linear:
    """One LARS step from train config on a 2x2 linear layer with a chosen gradient."""
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
        layer.bias.fill_(1.0)
    layer.weight.grad = torch.tensor([[0.0, 60.0], [80.0, 0.0]])  # ||g|| = 100
    layer.bias.grad = torch.full((2,), 0.5)
    opt = build_optimizer(layer, TrainConfig(optimizer="lars", lr=100.0, weight_decay=1.0))
    opt.step()
    return layer


def test_lars_step_by_hand():
    """lr 100, wd 1. Weight: trust * ||w|| / (||g|| + wd ||w||) = 1e-3 * 5 / 105, times
    g + wd w (the first momentum step is the update itself). Bias: plain SGD, no decay,
    no ratio. Fails if the bias were adapted or decayed, the weight not adapted, or the
    ratio taken on ||g + wd w|| = 100.1 (the hand-written LARS's form, 5% off here)."""
    layer = lars_step()
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    g = torch.tensor([[0.0, 60.0], [80.0, 0.0]])
    ratio = 1e-3 * 5 / (100 + 1.0 * 5)
    torch.testing.assert_close(layer.weight.detach(), w - 100.0 * ratio * (g + 1.0 * w))
    torch.testing.assert_close(layer.bias.detach(), torch.full((2,), 1.0 - 100.0 * 0.5))


def test_build_lars_from_config():
    opt = build_optimizer(nn.Linear(3, 3), TrainConfig(optimizer="lars", lr=0.5))
    assert isinstance(opt, Lars) and opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["trust_coeff"] == 1e-3
    with pytest.raises(ConfigError, match=r"lars needs train\.weight_decay > 0"):
        TrainConfig(optimizer="lars", weight_decay=0.0)
