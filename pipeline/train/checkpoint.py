"""Atomic, rotating checkpoints in ``<output_dir>/checkpoints/step_NNNNNNN``.

A checkpoint is written into a hidden temporary folder by ``accelerator.save_state``
(model, critics, optimizer, scheduler, per-rank RNG states; DeepSpeed shards too), then
``meta.json`` is added and the folder is renamed into place. A rename is atomic, so a
crash or a kill during a save leaves at most a stray temporary folder, never a broken
``step_*``: the latest good checkpoint stays the latest.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.core.files import clean_partial, new_partial, partial_of, replace_folder

__all__ = [
    "checkpoint_dir",
    "clean_partial_checkpoints",
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


def clean_partial_checkpoints(output_dir: str | Path) -> None:
    """Undo what a save that never finished left (main process only)."""
    clean_partial(checkpoint_dir(output_dir))


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, meta: dict[str, Any], keep_last: int
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    final = checkpoint_dir(output_dir) / f"step_{step:07d}"
    tmp = new_partial(final) if accelerator.is_main_process else partial_of(final)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=2))
        replace_folder(tmp, final)  # the same step may have been saved before (a resume)
        for stale in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict[str, Any]:
    """Restore everything registered with ``accelerator``; return the checkpoint's meta."""
    accelerator.load_state(str(path))
    return read_checkpoint_meta(path)
