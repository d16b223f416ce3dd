"""A run folder belongs to one configuration: the checks made before a run writes into it.

``check_output_dir`` says whether ``train.output_dir`` can hold a run (a non-empty path
that is a folder or can be created, and is writable) without creating anything.
``inspect_run`` reads what a folder already holds (the saved ``config.yaml``, the latest
checkpoint, whether the encoder was exported after it) and refuses a configuration that
differs from the saved one, so a rerun never overwrites another run's config, weights or
metrics.

What may change between a run and its continuation (``RESUMABLE``): the schedule length
(``train.max_steps``: a longer one continues a finished run), logging and checkpoint
cadence (``train.log_every``, ``train.eval_every``, ``train.save_every``,
``train.keep_last``), where the folder lives (``train.output_dir``: moving a folder keeps
its run), the tracker (``wandb.*``: it only observes), the step-speed options
(``train.compile``, ``train.channels_last``, ``train.keep_freed_memory``,
``train.threads``: they change how the step runs, not what it computes, and leave
parameter names and checkpoints as they are), and ``data.num_workers``, a throughput
knob whose only effect is which worker reads which resampled shard. Anything else
changes what is being trained (model, objective, data, optimiser, batch, seed);
``--force-config`` continues anyway and saves the new config once the checkpoint loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError, one_line
from pipeline.core.files import CONFIG_FILE, check_output_folder
from pipeline.train.checkpoint import latest_checkpoint, read_checkpoint_meta

__all__ = [
    "RESUMABLE",
    "RunState",
    "check_output_dir",
    "config_differences",
    "inspect_run",
]

RESUMABLE = (
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.output_dir",
    "train.compile",
    "train.channels_last",
    "train.keep_freed_memory",
    "train.threads",
    "data.num_workers",
    "wandb.*",
)


def check_output_dir(value: str) -> Path:
    """``train.output_dir`` as a Path, or one ConfigError saying why it cannot hold a run."""
    return check_output_folder(value, "train.output_dir", example="runs/my-run")


def _flat(config: dict) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, body in config.items()
        if isinstance(body, dict)
        for key, value in body.items()
    }


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE)


def config_differences(saved: dict, new: dict, defaults: dict) -> list[str]:
    """``key: saved -> new`` for every key outside ``RESUMABLE`` that differs.

    A key missing on one side (a config saved before the key existed) counts as its default.
    """
    saved, new, defaults = _flat(saved), _flat(new), _flat(defaults)
    out = []
    for key in sorted(set(saved) | set(new)):
        old_value = saved.get(key, defaults.get(key, _ABSENT))
        new_value = new.get(key, defaults.get(key, _ABSENT))
        if old_value != new_value and not _resumable(key):
            out.append(f"{key}: {_show(old_value)} -> {_show(new_value)}")
    return out


_ABSENT = object()  # a key neither the config nor the defaults know (one removed since)


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


@dataclass
class RunState:
    """What a run folder holds. ``step`` is 0 and ``checkpoint`` None for a new run."""

    checkpoint: Path | None = None
    step: int = 0
    samples_seen: int = 0
    exported: bool = False  # an export newer than the latest checkpoint exists
    changed: tuple[str, ...] = ()  # differing keys, accepted with force
    meta: dict = field(default_factory=dict)  # the latest checkpoint's meta.json

    def complete(self, max_steps: int) -> bool:
        return self.checkpoint is not None and self.step >= max_steps

    @property
    def train_seconds(self) -> float:
        """Seconds the run's earlier processes trained (0 for a new run)."""
        return float(self.meta.get("train_seconds", 0.0))


def inspect_run(
    output_dir: Path, config: dict, defaults: dict, *, force: bool, export_marker: str
) -> RunState:
    """Read-only: the state of ``output_dir`` for a run of ``config``.

    Raises ConfigError (one line) when the folder holds a run of another configuration
    and ``force`` is not set. ``export_marker`` is the file an export writes last.
    """
    saved_path = output_dir / CONFIG_FILE
    changed: list[str] = []
    if saved_path.is_file():
        try:
            saved = yaml.safe_load(saved_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(
                f"{saved_path} is not valid YAML ({one_line(err)}); move it away to start over"
            ) from None
        changed = config_differences(saved, config, defaults)
        if changed and not force:
            raise ConfigError(
                f"train.output_dir={str(output_dir)!r} holds a run with another configuration "
                f"({'; '.join(changed)}); start a new run with another train.output_dir, or "
                f"pass --force-config to continue this one with the new values"
            )
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        return RunState(changed=tuple(changed))
    meta = read_checkpoint_meta(ckpt)
    marker = output_dir / export_marker
    exported = marker.is_file() and marker.stat().st_mtime >= (ckpt / "meta.json").stat().st_mtime
    return RunState(
        ckpt, int(meta["step"]), int(meta.get("samples_seen", 0)), exported, tuple(changed), meta
    )
