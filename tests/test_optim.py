"""Optimizers and the schedule: warmup then cosine; LARS skips biases and norms."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.optim import LARS, build_optimizer, build_scheduler, lr_factor, param_groups


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
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    decay, plain = param_groups(model, 0.1)
    assert all(p.ndim >= 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.ndim == 1 for p in plain["params"]) and plain["weight_decay"] == 0.0


def test_lars_trust_ratio():
    w = nn.Parameter(torch.full((2, 2), 3.0))
    b = nn.Parameter(torch.ones(2))
    opt = LARS(
        [{"params": [w], "lars": True}, {"params": [b], "lars": False}],
        lr=1.0,
        momentum=0.0,
        trust=0.01,
    )
    w.grad = torch.full((2, 2), 100.0)
    b.grad = torch.full((2,), 0.5)
    opt.step()
    # ||w|| = 6, ||g|| = 200: the step is lr * 0.01 * 6/200 * g = 0.03 per entry
    torch.testing.assert_close(w.detach(), torch.full((2, 2), 3.0 - 0.03))
    torch.testing.assert_close(b.detach(), torch.full((2,), 0.5))  # plain SGD step


def test_build_lars_from_config():
    opt = build_optimizer(nn.Linear(3, 3), TrainConfig(optimizer="lars", lr=0.5))
    assert isinstance(opt, LARS) and opt.param_groups[0]["lr"] == 0.5
