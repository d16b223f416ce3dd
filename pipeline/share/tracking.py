"""Metrics sinks behind one interface: ``metrics.jsonl`` always, W&B when enabled.

Only the main process should build a ``Tracker``. The W&B run id is stored in the output
folder (``wandb_id.txt``), so a resumed run continues the same W&B run
(``resume="allow"``). ``metrics.jsonl`` is the local ground truth: one JSON object per
logged step; on resume, rows past the checkpoint's step are dropped first, so a step that
was logged after the last checkpoint and is then recomputed appears exactly once.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import wandb

from pipeline.core.files import METRICS, WANDB_ID
from pipeline.core.schema import WandbConfig

__all__ = [
    "EVAL_TABLE",
    "ONLINE_PROBE",
    "ONLINE_PROBES",
    "Tracker",
    "has_api_key",
    "read_metrics",
    "truncate_metrics",
    "wandb_mode",
]

EVAL_TABLE = "eval/table"  # the W&B key of the evaluation table (pipeline.evaluate --wandb)
# The online probe (pipeline.eval.online) logs ONLINE_PROBE + name: probe/knn, probe/linear.
ONLINE_PROBE = "probe/"
ONLINE_PROBES = ("knn", "linear")


def wandb_mode(mode: str) -> str:
    """``auto`` is online where an API key is set (env or ~/.netrc), offline otherwise."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_api_key() else "offline"


def has_api_key() -> bool:
    """A W&B API key is set: ``WANDB_API_KEY``, or ``wandb login``'s entry in ~/.netrc."""
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )


def read_metrics(path: str | Path, *, strict: bool = False) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``: the one parser of the file.

    A kill can tear the last line; such a line (or any line that is not a JSON object
    with a ``step``) is skipped, or with ``strict`` raises ``ValueError``, for callers
    that must see a whole file.
    """
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        elif strict:
            raise ValueError(f"{path}:{number} is not a metrics row: {line[:80]!r}")
    return rows


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only rows with ``step <= last_step`` (and drop a torn last line)."""
    if not path.is_file():
        return
    kept = [row for row in read_metrics(path) if row["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{json.dumps(row)}\n" for row in kept))
    os.replace(tmp, path)


class Tracker:
    """``log(row, step)`` to metrics.jsonl and W&B; ``close()`` at the end."""

    def __init__(
        self, output_dir: str | Path, cfg: WandbConfig, config: dict[str, Any], resume_step: int = 0
    ):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS
        truncate_metrics(self.path, resume_step)
        self.file = self.path.open("a")
        self.run = None
        mode = wandb_mode(cfg.mode)
        if mode != "disabled":
            self.run = self._start_wandb(cfg, mode, config)

    def _start_wandb(self, cfg: WandbConfig, mode: str, config: dict[str, Any]):

        id_file = self.dir / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity or None,
            name=cfg.name or self.dir.name,
            tags=list(cfg.tags) or None,
            config=config,
            dir=str(self.dir),
            id=run_id,
            resume="allow",
            mode=mode,
        )

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def wandb_info(self) -> dict | None:
        """Entity, project and id of the W&B run (for the model card), if there is one."""
        if self.run is None:
            return None
        return {"entity": self.run.entity, "project": self.run.project, "id": self.run.id}

    def log_model(self, folder: str | Path, step: int, final: bool = False) -> None:
        """The model folder as a version of the run's ``model`` artifact, ``model-<run id>``
        (the name W&B's own integrations use).

        W&B copies the files to a staging folder until they are uploaded; an offline run
        stages them in its own ``wandb/`` folder (unless ``WANDB_DATA_DIR`` says where),
        so ``wandb sync`` finds them there and deleting the run deletes them too.
        """
        if self.run is None:
            return

        offline = self.run.offline
        data_dir = os.environ.get("WANDB_DATA_DIR")
        if offline and data_dir is None:
            os.environ["WANDB_DATA_DIR"] = str(self.dir / "wandb" / "data")
        try:
            artifact = wandb.Artifact(
                f"model-{self.run.id}", type="model", metadata={"step": step, "format": "timm"}
            )
            artifact.add_dir(str(folder))
            aliases = ["latest", f"step_{step}"] + (["final"] if final else [])
            self.run.log_artifact(artifact, aliases=aliases)
        finally:
            if offline and data_dir is None:
                os.environ.pop("WANDB_DATA_DIR", None)

    def log(self, row: dict[str, float], step: int) -> None:
        row = {"step": step, **{k: v for k, v in row.items() if k != "step"}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self, exit_code: int = 0) -> None:
        self.file.close()
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
