"""Atomic, rotating checkpoints in ``<output_dir>/checkpoints/step_NNNNNNN``.

A checkpoint is written into a hidden temporary folder by ``accelerator.save_state``
(model, critics, optimizer, scheduler, per-rank RNG states; DeepSpeed shards too), then
``meta.json`` is added and the folder is renamed into place. A rename is atomic, so a
crash or a kill during a save leaves at most a stray temporary folder, never a broken
``step_*``: the latest good checkpoint stays the latest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.core.files import share_mode

__all__ = [
    "checkpoint_dir",
    "clean_partial",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_checkpoint_meta",
    "save_checkpoint",
]

META = "meta.json"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those holding ``meta.json``), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _NAME.match(p.name)) and (p / META).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint folder's ``meta.json`` (step, samples seen, tag, world size, W&B run id)."""
    return json.loads((Path(path) / META).read_text())


def clean_partial(output_dir: str | Path) -> None:
    """Remove temporary folders left by a save that never finished (main process only)."""
    root = checkpoint_dir(output_dir)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, meta: dict[str, Any], keep_last: int
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=2))
        share_mode(tmp)  # safetensors writes 0600; the run's files share the umask's mode
        if final.exists():  # the same step saved before (e.g. a resumed run's last save)
            old = root / f".tmp-old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        for stale in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict[str, Any]:
    """Restore everything registered with ``accelerator``; return the checkpoint's meta."""
    accelerator.load_state(str(path))
    return read_checkpoint_meta(path)
