"""DeepSpeed with bf16 on CPU: two gloo ranks through accelerate, ZeRO-2, bf16 weights.

DeepSpeed's CPU accelerator runs bf16 (its ``is_bf16_supported()`` is true), so this is a real
run, not an expected error. (ZeRO-2 without mixed precision, and resuming, are pinned in
test_train.py; the ZeRO-3 refusal in test_mistakes.py.)
"""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import ACCELERATE_LAUNCH, TINY, metrics, pretrain_cmd, run, write_shards

pytestmark = pytest.mark.slow  # multi-process


def test_deepspeed_bf16_on_cpu_trains_in_bf16(tmp_path):
    """Catches: bf16 asked for but the engine left in fp32 (mixed_precision not passed on),
    inputs not autocast to the bf16 weights, BatchNorm statistics left in fp32 beside
    bf16 weights (both crash the first step), a non-finite bf16 loss."""
    from pipeline.share.export import load_encoder

    shards = write_shards(tmp_path / "shards", n=64, per_shard=64)
    out = tmp_path / "run"
    launcher = [
        *ACCELERATE_LAUNCH,
        "--config_file",
        "launch/deepspeed_zero2.yaml",
        "--num_processes",
        "2",
    ]
    proc = run(
        pretrain_cmd(
            *TINY,
            f"data.train_shards={shards}",
            f"train.output_dir={out}",
            "train.max_steps=2",
            "train.log_every=1",
            "train.mixed_precision=bf16",
            "wandb.mode=disabled",
            launcher=launcher,
        ),
        timeout=240,
    )
    assert proc.returncode == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["world_size"] == 2 for r in rows)
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    # The engine's own weights (and the recast BatchNorm statistics) are bf16.
    states = torch.load(
        out / "checkpoints" / "step_0000002" / "pytorch_model" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )["module"]
    floats = {k: v.dtype for k, v in states.items() if v.is_floating_point()}
    assert floats and set(floats.values()) == {torch.bfloat16}, floats
    assert any("running_mean" in k for k in floats)
    encoder = load_encoder(out / "export")  # the export loads into an fp32 encoder
    with torch.no_grad():
        mu = encoder(torch.zeros(2, 3, 32, 32)).mu
    assert mu.dtype == torch.float32 and torch.isfinite(mu).all()
