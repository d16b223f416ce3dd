"""The logged ``lr`` is the rate the step used, as timm and torchtitan log it: step k
(counted from 1) trains with the schedule's value at index k - 1."""

from __future__ import annotations

import pytest
from train_helpers import TINY, metrics, pretrain_cmd, run, write_shards

from pipeline.train.optim import lr_factor

LR, WARMUP, STEPS = 2e-3, 3, 6


def test_logged_lr_is_the_rate_each_step_used(tmp_path):
    """With warmup 3 the rates used are lr/3, 2lr/3, lr, then the cosine. Catches: the
    rate read after the schedule stepped (step 1 would log 2lr/3, the next step's), a
    schedule stepped once per micro-batch (grad_accum=2 would run it twice as fast)."""
    shards = write_shards(tmp_path / "shards", n=64)
    out = tmp_path / "run"
    proc = run(
        pretrain_cmd(
            *TINY,
            f"data.train_shards={shards}",
            f"train.output_dir={out}",
            f"train.max_steps={STEPS}",
            f"train.warmup_steps={WARMUP}",
            f"train.lr={LR}",
            "train.grad_accum=2",
            "train.log_every=1",
            "wandb.mode=disabled",
        ),
        timeout=120,
    )
    assert proc.returncode == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert r["lr"] == pytest.approx(LR * lr_factor(r["step"] - 1, WARMUP, STEPS)), r
    assert rows[0]["lr"] == pytest.approx(LR / WARMUP)
