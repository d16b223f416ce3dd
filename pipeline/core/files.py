"""One mode for every file a run writes: the one the user's umask gives.

Some writers choose their own (safetensors creates 0600 files), which would leave
checkpoints and exports unreadable to a group sharing a run folder.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["share_mode", "umask_mode"]


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
