"""One writer per run folder (pipeline.train.lock): a second run on a busy folder is
refused in one line while the first goes on; a lock left by a dead process is taken over.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from train_helpers import ROOT, TINY, env, metrics, pretrain_cmd, run, write_shards

from pipeline.core.errors import ConfigError
from pipeline.core.files import LOCK_FILE
from pipeline.train import lock as lock_module
from pipeline.train.lock import RunLock


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n=256)


# Every step logged; no checkpoint but the one a stop writes; no W&B.
RUN = ("train.log_every=1", "train.save_every=100000", "wandb.mode=disabled")


def _cmd(shards: str, out: Path, max_steps: int) -> list[str]:
    folder = (f"data.train_shards={shards}", f"train.output_dir={out}")
    return pretrain_cmd(*TINY, *folder, f"train.max_steps={max_steps}", *RUN)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _holder(out: Path) -> dict | None:
    """The holder the lock file names, once it names one."""
    try:
        return json.loads((out / LOCK_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _logged_steps(out: Path) -> list[int]:
    try:
        return [r["step"] for r in metrics(out)]
    except (FileNotFoundError, ValueError):
        return []


def test_a_second_run_on_a_busy_folder_is_refused_and_the_first_goes_on(shards, tmp_path):
    """Catches: no lock (the second run cleans the first's checkpoint partials, writes its
    config and rows into the same files), a lock that names nobody, a refusal that is a
    traceback or touches the first run's lock."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        _cmd(shards, out, 100000),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: _holder(out), first)  # the first holds the folder: start another
        holder = _holder(out)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

        # Short, so that a second writer (the bug) ends soon and fails the test.
        second = run(_cmd(shards, out, 3), timeout=120)
        assert second.returncode == 2
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("pretrain.py: error:") and "Traceback" not in second.stderr
        assert f"pid {first.pid} on {socket.gethostname()}" in last and str(out) in last
        assert json.loads((out / LOCK_FILE).read_text()) == holder

        assert first.poll() is None  # the first run goes on training
        seen = len(_logged_steps(out))
        _wait_for(lambda: len(_logged_steps(out)) > seen + 2, first)
    finally:
        first.send_signal(signal.SIGTERM)  # a normal stop: save, then exit 0
        _stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
    steps = [r["step"] for r in metrics(out)]
    assert len(steps) > seen + 2 and steps == list(range(1, len(steps) + 1))  # once, in order
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_a_lock_left_by_a_dead_process_is_taken_over(shards, tmp_path):
    """A run SIGKILLed leaves its lock file behind (the kernel drops the lock itself).
    Catches: a leftover file taken for a live holder (the folder would be stuck for
    good), or taken over without a word."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "started": "2020-01-01T00:00:00"}
    (out / LOCK_FILE).write_text(json.dumps(stale))
    proc = run(_cmd(shards, out, 2), timeout=120)
    assert proc.returncode == 0
    said = [line for line in proc.stdout.splitlines() if "taking over" in line]
    assert len(said) == 1 and f"pid {dead.pid} on {socket.gethostname()}" in said[0]
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert not (out / LOCK_FILE).exists()


def test_the_lock_names_its_holder_and_release_leaves_nothing(tmp_path):
    """In one process: a second open of the file is a second holder to flock. Catches: a
    release that leaves the file or the folder it created, a refusal without the holder."""
    folder = tmp_path / "new" / "run"
    first = RunLock(folder)
    assert first.acquire() is None  # a fresh folder: nothing to take over
    with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on "):
        RunLock(folder).acquire()
    first.release()
    assert not folder.exists()  # created by the lock and left empty: removed
    again = RunLock(folder)
    assert again.acquire() is None
    (folder / "config.yaml").write_text("{}")
    again.release()
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]


def test_a_filesystem_without_locks_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_locks)
    note = RunLock(tmp_path).acquire()
    assert note is not None and "no locks" in note and "would not be stopped" in note
