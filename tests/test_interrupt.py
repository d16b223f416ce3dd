"""Ctrl-C behaves like SIGTERM: a real SIGINT to a real run saves at the step's end and
exits 0; a second one quits at once (exit 130, one line), and whatever it cut short is
gone after the next start, which resumes from the last finished checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_helpers import ROOT, TINY, env, metrics, pretrain_cmd, run, write_shards

from pipeline.core.files import LOCK_FILE
from pipeline.train.batches import StopFlag
from pipeline.train.checkpoint import checkpoint_dir, list_checkpoints, read_checkpoint_meta

MAX_STEPS = 100000  # never reached: each run here ends by Ctrl-C or by a shorter rerun


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n=256)


def _cmd(shards: str, out: Path, *extra: str) -> list[str]:
    where = (f"data.train_shards={shards}", f"train.output_dir={out}", "wandb.mode=disabled")
    return pretrain_cmd(*TINY, *where, "train.log_every=1", "train.save_every=4", *extra)


def _start(cmd: list[str]) -> subprocess.Popen:
    """The run in its own process group, as a terminal's foreground job is: Ctrl-C there
    signals the whole group, data-loader workers included."""
    captured = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), start_new_session=True, **captured)


def _wait_until(predicate, proc: subprocess.Popen, timeout: float = 90, pause=0.05) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(pause)


def _steps(out: Path) -> list[int]:
    try:
        return [r["step"] for r in metrics(out)]
    except (FileNotFoundError, ValueError):
        return []


def _partials(out: Path) -> list[Path]:
    return sorted(out.rglob(".tmp-*"))


def test_ctrl_c_saves_at_the_step_end_and_exits_cleanly(shards, tmp_path):
    """Catches: SIGINT left to Python (a KeyboardInterrupt traceback wherever it lands,
    nothing saved), data-loader workers killed by it, the run not ending after the save."""
    out = tmp_path / "run"
    proc = _start(_cmd(shards, out, f"train.max_steps={MAX_STEPS}", "data.num_workers=2"))
    _wait_until(lambda: len(_steps(out)) >= 6, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "Ctrl-C: saving" in stderr
    last = list_checkpoints(out)[-1]
    meta = read_checkpoint_meta(last)
    assert meta["tag"] == "preempted" and meta["step"] == _steps(out)[-1] >= 6
    assert not _partials(out) and not (out / LOCK_FILE).exists()


def test_a_second_ctrl_c_quits_at_once_and_the_next_start_cleans_up(shards, tmp_path):
    """The second SIGINT is sent while the first's checkpoint is being written, and lands
    there (its temporary folder is still present after the exit). Catches: a second
    Ctrl-C that waits for the save, a traceback, a partial the next start does not
    remove, a resume that does not continue from the last finished checkpoint."""
    out = tmp_path / "run"
    proc = _start(_cmd(shards, out, f"train.max_steps={MAX_STEPS}"))
    _wait_until(lambda: len(list_checkpoints(out)) >= 2, proc)  # steps 4 and 8 are saved
    os.killpg(proc.pid, signal.SIGINT)
    _wait_until(lambda: list(checkpoint_dir(out).glob(".tmp-step_*")), proc, pause=0.001)
    os.killpg(proc.pid, signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("pretrain.py: interrupted, not saved") and "Traceback" not in stderr
    (partial,) = _partials(out)  # the save the second Ctrl-C cut short
    assert partial.parent == checkpoint_dir(out) and partial.name.startswith(".tmp-step_")
    saved = read_checkpoint_meta(list_checkpoints(out)[-1])["step"]
    assert saved < int(partial.name.removeprefix(".tmp-step_"))
    assert not (out / LOCK_FILE).exists()

    again = run(_cmd(shards, out, f"train.max_steps={saved + 2}"), timeout=120)
    assert again.returncode == 0
    assert f"at step {saved}" in again.stdout  # resumed from the last finished checkpoint
    assert not _partials(out)
    assert _steps(out) == list(range(1, saved + 3))


def test_stop_flag_in_process_first_sigint_flags_second_raises_handlers_restored():
    """Catches: a first Ctrl-C that raises, a second that does not, handlers left
    installed after the run (a caller's own Ctrl-C would then be swallowed)."""
    before = {sig: signal.getsignal(sig) for sig in StopFlag.SIGNALS}
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in StopFlag.SIGNALS} == before
