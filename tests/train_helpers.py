"""Shared pieces of the training tests: tiny shards, a tiny model, subprocess runs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from pipeline.core.files import METRICS
from pipeline.share.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ACCELERATE_LAUNCH = [PY, "-m", "accelerate.commands.launch"]  # no reliance on PATH

# test_resnet at 32x32, small heads and critics, batch 8: a step takes tens of ms on CPU.
TINY = [
    "model.backbone=test_resnet",
    "model.img_size=32",
    "model.fc_dim=64",
    "model.code_dim=32",
    "loss.critic_dim=64",
    "loss.critic_hidden=64",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.lr=2e-3",
    "data.num_workers=0",
    "data.shuffle_buffer=64",
    "data.epoch_samples=512",
]


def write_shards(folder: Path, n: int = 512, per_shard: int = 256) -> str:
    """Digits as 32x32 PNG + .cls in WebDataset tars; returns a brace pattern."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from pipeline.data.digits import load_digits_uint8

    images, labels = load_digits_uint8()
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            img = Image.fromarray(np.kron(images[i], np.ones((4, 4), np.uint8)))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": str(int(labels[i]))})
    last = (n - 1) // per_shard
    return str(folder / f"train-{{000000..{last:06d}}}.tar")


def env() -> dict[str, str]:
    e = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=str(ROOT),
        TOKENIZERS_PARALLELISM="false",
    )
    e.pop("WANDB_API_KEY", None)
    return e


def pretrain_cmd(*overrides: str, launcher: list[str] | None = None) -> list[str]:
    head = launcher if launcher is not None else [PY]
    return [*head, str(ROOT / "pretrain.py"), *overrides]


def run(
    cmd: list[str],
    timeout: float = 300,
    *,
    cwd: Path = ROOT,
    env_update: dict[str, str | None] | None = None,
) -> subprocess.CompletedProcess:
    """``cmd`` in the test environment (``env_update``: variables set, or removed where
    None), output captured; printed when it fails, so pytest shows it."""
    e = env()
    for key, value in (env_update or {}).items():
        if value is None:
            e.pop(key, None)
        else:
            e[key] = value
    proc = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-8000:], sep="\n")
    return proc


def metrics(output_dir: Path) -> list[dict]:
    """The run's metrics rows; a torn or foreign line fails the test."""
    return read_metrics(output_dir / METRICS, strict=True)
