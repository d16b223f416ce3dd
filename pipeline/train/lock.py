"""One writer per run folder: ``train.output_dir/run.lock``, held by the main process.

The lock is ``flock`` on a descriptor held for the whole run, not a file created with
``O_EXCL``: the kernel (the NFS server, across hosts) drops it when the holder dies,
however it dies, so a dead run's lock is told from a live one without guessing from a
pid, also when a requeued job lands on another node. The file names its holder (host,
pid, start time) for the refusal; a free lock whose file still names a holder is what a
killed run left, and is taken over with a line saying so. On a filesystem without locks
the run goes on, said once: a lock that cannot be taken must not stop every run there.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from accelerate.utils import broadcast_object_list

from pipeline.core.errors import ConfigError
from pipeline.core.files import LOCK_FILE

__all__ = ["RunLock", "one_writer"]

_HELD = (errno.EAGAIN, errno.EACCES)  # flock(LOCK_NB) on a lock someone else holds
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def this_holder() -> dict:
    """What the lock file says about the process holding it."""
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started}


def describe(holder: dict) -> str:
    """``pid N on HOST, started T``, or what is known of an unreadable holder."""
    if not holder:
        return "a holder that left no name"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


class RunLock:
    """The lock of one run folder. ``acquire`` returns a line to say (a take-over, or no
    locking on this filesystem) or None, and raises ConfigError while another holds it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None
        self.created_folder = False

    def acquire(self) -> str | None:
        if not self.folder.exists():
            self.folder.mkdir(parents=True)
            self.created_folder = True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                previous = _read(fd)
                os.close(fd)
                if err.errno in _HELD:
                    raise self._refusal(previous) from None
                if err.errno in _UNSUPPORTED:
                    return (
                        f"{self.path}: this filesystem has no locks ({err.strerror}); "
                        "a second run on this folder would not be stopped"
                    )
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file as we opened it: open the new one
        self.fd = fd
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(this_holder()).encode(), 0)
        if previous is None:
            return None
        return (
            f"{self.path}: the run that held this folder ({describe(previous)}) is gone; "
            "taking over"
        )

    def _refusal(self, holder: dict | None) -> ConfigError:
        return ConfigError(
            f"train.output_dir={str(self.folder)!r} is in use by another run "
            f"({describe(holder or {})}); wait for it to end, or choose another train.output_dir"
        )

    def release(self) -> None:
        """Remove the file, then drop the lock (in that order: whoever opens the path next
        finds a new file, never this one); a folder that the lock created and that is still
        empty goes too."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None
        if self.created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # fails, as it should, once the run wrote anything


def _read(fd: int) -> dict | None:
    """The holder a lock file names; None for an empty file, {} for an unreadable one."""
    text = os.pread(fd, 4096, 0)
    if not text.strip():
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def one_writer(accelerator, folder: str | Path):
    """Collective: the main process holds ``folder``'s lock for the ``with`` block, and
    every rank raises the same ConfigError when another run holds it."""
    lock = RunLock(folder) if accelerator.is_main_process else None
    outcome: list = [None]  # the refusal's text, for every rank
    if lock is not None:
        try:
            note = lock.acquire()
        except ConfigError as err:
            outcome = [str(err)]
        else:
            if note:
                print(note, flush=True)
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[0] is not None:
        raise ConfigError(outcome[0])
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
