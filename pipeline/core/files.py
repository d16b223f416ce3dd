"""The files a run folder holds, named once, and how folders in it are written: whole or
not at all, in the mode the user's umask gives.

A checkpoint or an export is built beside its final place and renamed in (a rename is
atomic), so a reader, or a run resumed after a crash, sees the old folder or the new one,
never half of one. Some writers choose their own file mode (safetensors creates 0600
files), which would leave checkpoints and exports unreadable to a group sharing a run
folder, so a finished folder is given the umask's mode before it is moved in.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.core.errors import ConfigError

__all__ = [
    "CONFIG_FILE",
    "LOCK_FILE",
    "METRICS",
    "PICTURE",
    "PLOT",
    "WANDB_ID",
    "check_output_folder",
    "clean_partial",
    "human_bytes",
    "new_partial",
    "partial_of",
    "replace_folder",
    "share_mode",
    "umask_mode",
]

CONFIG_FILE = "config.yaml"  # the resolved config of the run
METRICS = "metrics.jsonl"  # one JSON row per logged step
PLOT = "metrics.png"  # the training curves
LOCK_FILE = "run.lock"  # held by the run writing the folder: host, pid, start time
PICTURE = "neighbours.png"  # query images and their nearest neighbours, in the model folder
WANDB_ID = "wandb_id.txt"  # the W&B run id, so a resumed run continues the same W&B run

_BUILDING, _PARKED = ".tmp-", ".tmp-old-"  # beside a folder being replaced


def umask_mode(base: int = 0o666) -> int:
    """The mode the umask leaves of ``base``: what a plain ``open(path, "w")`` gives a new
    file (0o666), or ``mkdir`` a new folder (0o777)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def share_mode(*paths: Path) -> None:
    """Give ``paths`` (files, or folders and everything under them) the umask's mode.

    Folders count too: ``tempfile.mkdtemp`` makes a private (0700) one.
    """
    file_mode, folder_mode = umask_mode(0o666), umask_mode(0o777)
    for path in map(Path, paths):
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            mode = folder_mode if p.is_dir() else file_mode
            if (p.is_dir() or p.is_file()) and (os.stat(p).st_mode & 0o777) != mode:
                os.chmod(p, mode)


def partial_of(final: str | Path) -> Path:
    """Where ``final`` is built before ``replace_folder`` moves it in."""
    final = Path(final)
    return final.parent / f"{_BUILDING}{final.name}"


def new_partial(final: str | Path) -> Path:
    """An empty folder beside ``final`` to build it in (``replace_folder`` moves it in)."""
    building = partial_of(final)
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    return building


def replace_folder(built: Path, final: str | Path) -> Path:
    """Move the finished folder ``built`` to ``final``, replacing what is there; returns
    ``final``. The old folder is parked first, so a crash between the two renames leaves
    it for ``clean_partial`` to put back."""
    final = Path(final)
    share_mode(built)
    parked = final.parent / f"{_PARKED}{final.name}"
    shutil.rmtree(parked, ignore_errors=True)
    if final.exists():
        os.replace(final, parked)
    os.replace(built, final)
    shutil.rmtree(parked, ignore_errors=True)
    return final


def clean_partial(parent: str | Path) -> None:
    """Undo what a killed ``replace_folder`` left in ``parent``: a parked folder whose
    replacement never arrived goes back in place; half-built folders are removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for parked in parent.glob(f"{_PARKED}*"):
        final = parent / parked.name.removeprefix(_PARKED)
        if not final.exists():
            os.replace(parked, final)
    for partial in parent.glob(f"{_BUILDING}*"):
        shutil.rmtree(partial, ignore_errors=True)


def check_output_folder(value: str | Path, what: str, *, example: str = "out") -> Path:
    """``value`` as a Path that a tool can write into (a folder, or one it can create), or
    one ConfigError naming ``what`` (the option) and why not. Creates nothing."""
    if not str(value).strip():
        raise ConfigError(f"{what} is empty: give the folder to write to (e.g. {what}={example})")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}={str(value)!r} is a file, not a folder")
    existing = path.absolute()
    while not existing.exists():  # the nearest folder that exists must let us create the rest
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what}={str(value)!r} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{what}={str(value)!r} is not writable (no write permission on {existing})"
        )
    return path


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units (B, KiB, MiB, GiB), as shard sizes are given."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
