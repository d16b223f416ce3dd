"""A killed run always comes back: SIGKILL at random moments, restart, repeat.

Each run is killed with SIGKILL (no handler, no save) at least five times: at a random
time after start (imports, set-up, the first batch), at a random step, while a
checkpoint is being written (the test watches for ``checkpoints/.tmp-step_*`` and checks
it is still there after the kill, so the kill provably landed inside the save), and
right after the last checkpoint, before or during the export. Then one more start
finishes the run. What must hold: every step is logged exactly once in
``metrics.jsonl``, the export loads, no temporary folder is left, and the final
checkpoint has the step and sample count of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from train_helpers import ACCELERATE_LAUNCH, ROOT, TINY, env, metrics, pretrain_cmd, write_shards

from pipeline.core.files import METRICS
from pipeline.share.tracking import read_metrics

BATCH = 8  # TINY's train.batch_size


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n=256)


def _args(shards: str, out: Path, max_steps: int) -> list[str]:
    return [
        *TINY,
        f"data.train_shards={shards}",
        f"train.output_dir={out}",
        f"train.max_steps={max_steps}",
        "train.log_every=1",
        "train.save_every=3",
        "train.keep_last=2",
        "wandb.mode=disabled",
    ]


def _logged_step(out: Path) -> int:
    try:
        rows = read_metrics(out / METRICS)  # skips a line torn by an earlier kill
    except FileNotFoundError:
        return 0
    return rows[-1]["step"] if rows else 0


def _saving(out: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(out / "checkpoints") if e.name.startswith(".tmp-step_")]
    except FileNotFoundError:
        return []


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and every process below it, as a scheduler
    ending the job would. torch's elastic launcher starts each rank in a session of its
    own, so the group kill alone leaves the ranks running (waiting for each other)."""
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ranks = []
    os.killpg(proc.pid, signal.SIGKILL)
    for child in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)


def _kill_when(cmd: list[str], out: Path, trigger, timeout: float = 240) -> tuple[str, int | None]:
    """Start ``cmd``, SIGKILL its process group once ``trigger()`` is true; returns
    (what the kill hit, the exit code if the run ended by itself first)."""
    with open(out.parent / f"{out.name}.log", "a") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env(), stdout=log, stderr=log, start_new_session=True
        )
        deadline = time.time() + timeout
        while proc.poll() is None and time.time() < deadline:
            hit = trigger()
            if hit:
                _kill_job(proc)
                # the save had not finished if its temporary folder outlived the process
                return (
                    "save"
                    if hit == "save" and _saving(out)
                    else "after-save"
                    if hit == "save"
                    else hit
                ), None
            time.sleep(0.001)
        if proc.poll() is None:
            _kill_job(proc)
            raise TimeoutError(f"no trigger within {timeout} s")
        return "none", proc.returncode


def _trigger(kind: str, out: Path, final: Path, rng: random.Random):
    """A function that says when to kill (and what the kill hits), or None until then."""
    started = time.time()
    if kind == "startup":
        delay = rng.uniform(0.5, 4.0)
        return lambda: "startup" if time.time() - started > delay else None
    if kind == "step":
        target = _logged_step(out) + rng.randint(1, 4)
        return lambda: "step" if _logged_step(out) >= target else None
    if kind == "save":
        return lambda: "save" if _saving(out) else None
    return lambda: "final" if final.is_dir() else None


def _kill_repeatedly(cmd: list[str], out: Path, max_steps: int, seed: int) -> list[str]:
    """At least five kills of every kind (one provably inside a save), then a clean finish."""
    rng = random.Random(seed)
    final = out / "checkpoints" / f"step_{max_steps:07d}"
    plan = ["startup", "step", "save", "step", "save", "final"]
    hits: list[str] = []
    while plan:
        kind = plan.pop(0)
        trigger = _trigger(kind, out, final, rng)
        hit, code = _kill_when(cmd, out, trigger)
        assert code is None, f"the run ended (code {code}) before the '{kind}' kill"
        hits.append(hit)
        if hit == "after-save" and hits.count("after-save") <= 3:
            plan.insert(0, "save")  # landed after the rename: try another save
    finish = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr[-3000:]
    print(f"kills in {out.name}: {hits}")  # shown with pytest -s
    return hits


def _check_run(out: Path, max_steps: int, world: int) -> dict:
    """Every step logged once, the last checkpoint at max_steps, a loadable export, no
    temporary folder left; returns the last checkpoint's meta."""
    import torch

    from pipeline.share.export import load_encoder
    from pipeline.train.checkpoint import latest_checkpoint, read_checkpoint_meta

    assert [r["step"] for r in metrics(out)] == list(range(1, max_steps + 1))
    meta = read_checkpoint_meta(latest_checkpoint(out))
    assert meta["step"] == max_steps and meta["samples_seen"] == max_steps * BATCH * world
    assert not [p.name for p in out.rglob(".tmp-*")] + [p.name for p in out.glob(".old-*")]
    encoder = load_encoder(out / "export")
    with torch.no_grad():
        assert torch.isfinite(encoder(torch.zeros(2, 3, 32, 32)).mu).all()
    return meta


def test_sigkill_at_random_moments_single_process(shards, tmp_path):
    """Bugs caught: a step logged twice or lost across restarts, a half-written
    checkpoint taken as the latest, a run killed before its export never exporting
    (or re-training), samples_seen drifting from an uninterrupted run's."""
    max_steps = 30
    reference = tmp_path / "reference"
    proc = subprocess.run(
        pretrain_cmd(*_args(shards, reference, max_steps)),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed"
    hits = _kill_repeatedly(pretrain_cmd(*_args(shards, out, max_steps)), out, max_steps, seed=1)
    assert len(hits) >= 5 and "save" in hits and "final" in hits, hits
    meta = _check_run(out, max_steps, 1)
    expected = _check_run(reference, max_steps, 1)
    assert (meta["step"], meta["samples_seen"]) == (expected["step"], expected["samples_seen"])
    assert len(metrics(out)) == len(metrics(reference))


def test_sigkill_at_random_moments_two_processes(shards, tmp_path):
    """The same through `accelerate launch --config_file launch/cpu.yaml` (two gloo
    ranks, killed together as a job would be); an uninterrupted two-process run ends at
    max_steps with samples_seen = steps x 8 x 2 (pinned in test_train)."""
    max_steps = 24
    out = tmp_path / "killed2"
    launcher = [*ACCELERATE_LAUNCH, "--config_file", "launch/cpu.yaml"]
    hits = _kill_repeatedly(
        pretrain_cmd(*_args(shards, out, max_steps), launcher=launcher), out, max_steps, seed=2
    )
    assert len(hits) >= 5 and "save" in hits and "final" in hits, hits
    meta = _check_run(out, max_steps, 2)
    assert meta["world_size"] == 2
    assert all(r["world_size"] == 2 for r in metrics(out))
