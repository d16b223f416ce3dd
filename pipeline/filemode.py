"""One mode for every file a run writes: the one the user's umask gives.

Some writers choose their own (safetensors creates 0600 files), which would leave
checkpoints and exports unreadable to a group sharing a run folder.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["share_mode", "umask_mode"]


def umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file (0o666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def share_mode(*paths: Path) -> None:
    """Give ``paths`` (files, or every file under a folder) the umask mode."""
    mode = umask_mode()
    for path in paths:
        files = [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() else [path]
        for f in files:
            if Path(f).is_file() and (os.stat(f).st_mode & 0o777) != mode:
                os.chmod(f, mode)
