"""``pretrain.py`` started by the doctor: the short runs behind the DeepSpeed check and
the training loop's speed, in the user's folder with the user's configuration."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.core.files import METRICS
from pipeline.doctor.machine import local_devices, package_version
from pipeline.doctor.row import Row
from pipeline.share.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED_TIMEOUT_S = 300


def launch_env(two_cpu_ranks: bool = True) -> dict[str, str]:
    """The environment of a ``pretrain.py`` the doctor starts: this project importable,
    W&B off; on a CPU node with ``two_cpu_ranks``, DeepSpeed's CPU accelerator and one
    thread per rank (two ranks share the cores)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    e = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONPATH=path)
    if two_cpu_ranks and not torch.cuda.is_available():
        e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return e


@dataclasses.dataclass
class ShortRun:
    """A short ``pretrain.py`` the doctor started: its exit code, the last line it wrote
    to stderr (what a failure says), its metrics rows (none on failure), its wall time."""

    returncode: int
    last_line: str
    rows: list[dict]
    seconds: float


def short_run(
    launcher: list[str],
    config: str | None,
    overrides: list[str],
    shards: str,
    *,
    steps: int,
    log_every: int,
    env: dict[str, str],
    timeout: float,
    extra: tuple[str, ...] = (),
) -> ShortRun:
    """``launcher pretrain.py`` with the user's configuration on ``shards`` for ``steps``
    steps into a temporary folder, without validation, online probe, time budget or W&B. It runs in
    the caller's folder: the config and shard paths are relative to it."""
    with tempfile.TemporaryDirectory(prefix="dim-doctor-") as out:
        cmd = [
            *launcher,
            str(ROOT / "pretrain.py"),
            *(["--config", config] if config else []),
            *overrides,
            f"data.train_shards={shards}",
            "data.val_shards=",
            *extra,
            f"train.output_dir={out}",
            f"train.max_steps={steps}",
            "train.max_minutes=0",  # the steps asked for, whatever the user's budget
            "train.warmup_steps=0",
            f"train.log_every={log_every}",
            "train.eval_every=0",
            "wandb.mode=disabled",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
        rows = read_metrics(Path(out) / METRICS) if proc.returncode == 0 else []
    last = (proc.stderr.strip().splitlines() or [""])[-1][:200]
    return ShortRun(proc.returncode, last, rows, seconds)


def deepspeed_row(config: str | None, overrides: list[str], shards: str, enabled: bool) -> Row:
    check = "DeepSpeed ZeRO-2 runs two steps"
    launch = ROOT / "launch" / "deepspeed_zero2.yaml"
    if not enabled:
        return Row("correctness", check, "not run", status="skip", reason="off: pass --deepspeed")
    if package_version("deepspeed") is None or not launch.is_file():
        why = "deepspeed not installed" if launch.is_file() else f"{launch} not found"
        return Row("correctness", check, "not run", status="skip", reason=why)
    processes = local_devices() if torch.cuda.is_available() else 2  # CPU: 2 gloo ranks
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch)]
    run = short_run(
        [*launcher, "--num_processes", str(processes)],
        config,
        overrides,
        shards,
        steps=2,
        log_every=1,
        env=launch_env(),
        timeout=DEEPSPEED_TIMEOUT_S,
        extra=("data.num_workers=0",),
    )
    steps = [r.get("step") for r in run.rows]
    ok = steps == [1, 2] and all(math.isfinite(r["loss"]) for r in run.rows)
    return Row(
        "correctness",
        check,
        f"{processes} processes, steps logged {steps} in {run.seconds:.0f} s"
        if ok
        else f"exit {run.returncode}: {run.last_line}",
        run.seconds,
        "s",
        "pass" if ok else "fail",
        "accelerate launch --config_file launch/deepspeed_zero2.yaml pretrain.py, 2 steps",
    )
