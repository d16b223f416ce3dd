"""A killed run always comes back: SIGKILL at random moments, restart, repeat.

Each run is killed with SIGKILL (no handler, no save) at least five times: at a random
time after start (imports, set-up, the first batch), at a random step, while a
checkpoint is being written (the test watches for ``checkpoints/.tmp-step_*`` and checks
it is still there after the kill, so the kill provably landed inside the save), and
right after the last checkpoint, before or during the export. Then one more start
finishes the run. What must hold: every step is logged exactly once in
``metrics.jsonl``, the export loads, no temporary folder is left, the final
checkpoint has the step and sample count of an uninterrupted run, and resumes carry
the run on rather than restart it: the export of the last launch, which only loads
the final checkpoint and exports, holds that checkpoint's weights; every logged rate
is the schedule's at its step; and a restart retraces what the killed attempt did:
started from the same checkpoint (same weights, optimizer, RNG states and data
stream), it logs the same loss terms, MI estimates, rate and gradient norm for every
step both reached (a launch from scratch, what the uninterrupted run logged).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ACCELERATE_LAUNCH, ROOT, TINY, env, metrics, pretrain_cmd, write_shards

from pipeline.core.files import METRICS
from pipeline.share.export import EXPORT_BACKBONE, EXPORT_DIR, load_encoder
from pipeline.share.tracking import read_metrics
from pipeline.train.checkpoint import latest_checkpoint, read_checkpoint_meta
from pipeline.train.optim import lr_factor

BATCH, LR, WARMUP = 8, 2e-3, 2  # TINY's train.batch_size, train.lr, train.warmup_steps


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


def _rows(out: Path) -> list[dict]:
    try:
        return read_metrics(out / METRICS)  # skips a line torn by a kill
    except FileNotFoundError:
        return []


def _start_step(out: Path) -> int:
    """The step a launch resumes from: its latest complete checkpoint's, or 0."""
    latest = latest_checkpoint(out)
    return read_checkpoint_meta(latest)["step"] if latest else 0


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


class Attempts:
    """What each launch logged, keyed by the checkpoint step it started from."""

    def __init__(self, out: Path):
        self.out, self.logged = out, []

    def launch(self, start) -> None:
        """Run ``start()`` (one launch) and keep the rows it added past its checkpoint."""
        begin, before = _start_step(self.out), _rows(self.out)
        start()
        # Rows of an earlier attempt left in place (a kill before the tracker opened)
        # are not this launch's: every row carries its own throughput, so none repeats.
        rows = [r for r in _rows(self.out) if r["step"] > begin and r not in before]
        self.logged.append((begin, rows))


def _kill_repeatedly(cmd: list[str], out: Path, max_steps: int, seed: int) -> tuple[list, Attempts]:
    """At least five kills of every kind (one provably inside a save), then a clean finish.
    Returns what the kills hit and what each launch logged."""
    rng = random.Random(seed)
    final = out / "checkpoints" / f"step_{max_steps:07d}"
    plan = ["startup", "step", "save", "step", "save", "final"]
    hits: list[str] = []
    attempts = Attempts(out)

    def kill(kind: str) -> None:
        hit, code = _kill_when(cmd, out, _trigger(kind, out, final, rng))
        assert code is None, f"the run ended (code {code}) before the '{kind}' kill"
        hits.append(hit)

    def finish() -> None:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    while plan:
        kind = plan.pop(0)
        attempts.launch(lambda kind=kind: kill(kind))
        if hits[-1] == "after-save" and hits.count("after-save") <= 3:
            plan.insert(0, "save")  # landed after the rename: try another save
    # Rarely the final kill lands after the export: without it, the last launch must
    # load the final checkpoint to export it, which _export_is_the_final_checkpoint checks.
    shutil.rmtree(out / EXPORT_DIR, ignore_errors=True)
    attempts.launch(finish)
    print(f"kills in {out.name}: {hits}")  # shown with pytest -s
    return hits, attempts


def _retraced(attempts: Attempts, reference: list[dict] | None = None) -> int:
    """Every step logged by two launches from the same checkpoint (or by a launch from
    scratch and the uninterrupted ``reference``) has the same values, throughput aside.
    Returns how many rows were compared."""
    seen = {(0, r["step"]): r for r in reference or []}
    compared = 0
    for begin, rows in attempts.logged:
        for row in rows:
            first = seen.setdefault((begin, row["step"]), row)
            if first is not row:
                same = [k for k in first if "per_s" not in k]
                assert {k: row[k] for k in same} == pytest.approx(
                    {k: first[k] for k in same}, rel=1e-6, abs=1e-9
                ), f"step {row['step']} after a restart from step {begin}"
                compared += 1
    return compared


def _export_is_the_final_checkpoint(out: Path, max_steps: int) -> None:
    """The exported backbone equals the final checkpoint's, tensor for tensor."""
    saved = load_file(str(out / "checkpoints" / f"step_{max_steps:07d}" / "model.safetensors"))
    exported = load_file(str(out / EXPORT_DIR / EXPORT_BACKBONE))
    assert exported
    for k, v in exported.items():
        assert torch.equal(v, saved[f"encoder.backbone.{k}"]), k


def _check_run(out: Path, max_steps: int, world: int) -> dict:
    """Every step logged once at the schedule's rate, the last checkpoint at max_steps, a
    loadable export, no temporary folder left; returns the last checkpoint's meta."""
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, max_steps + 1))
    for r in rows:  # the rate each step used: a schedule restarted on resume differs
        assert r["lr"] == pytest.approx(LR * lr_factor(r["step"] - 1, WARMUP, max_steps)), r
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
    (or re-training), samples_seen drifting from an uninterrupted run's, a resume that
    starts from fresh weights or a fresh schedule, a restart that does not retrace the
    steps the killed attempt ran from the same checkpoint."""
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
    cmd = pretrain_cmd(*_args(shards, out, max_steps))
    hits, attempts = _kill_repeatedly(cmd, out, max_steps, seed=1)
    assert len(hits) >= 5 and "save" in hits and "final" in hits, hits
    meta = _check_run(out, max_steps, 1)
    expected = _check_run(reference, max_steps, 1)
    assert (meta["step"], meta["samples_seen"]) == (expected["step"], expected["samples_seen"])
    assert len(metrics(out)) == len(metrics(reference))
    # the kill inside a save leaves its steps to be run again from the same checkpoint
    assert _retraced(attempts, metrics(reference)) >= 3
    _export_is_the_final_checkpoint(out, max_steps)


def test_sigkill_at_random_moments_two_processes(shards, tmp_path):
    """The same through `accelerate launch --config_file launch/cpu.yaml` (two gloo
    ranks, killed together as a job would be); an uninterrupted two-process run ends at
    max_steps with samples_seen = steps x 8 x 2 (pinned in test_train)."""
    max_steps = 24
    out = tmp_path / "killed2"
    launcher = [*ACCELERATE_LAUNCH, "--config_file", "launch/cpu.yaml"]
    hits, attempts = _kill_repeatedly(
        pretrain_cmd(*_args(shards, out, max_steps), launcher=launcher), out, max_steps, seed=2
    )
    assert len(hits) >= 5 and "save" in hits and "final" in hits, hits
    assert _retraced(attempts) >= 1
    _export_is_the_final_checkpoint(out, max_steps)
    meta = _check_run(out, max_steps, 2)
    assert meta["world_size"] == 2
    assert all(r["world_size"] == 2 for r in metrics(out))
