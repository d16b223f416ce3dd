"""``python -m pipeline.doctor`` / ``dim-doctor``: does this node work, and what will limit it?

``python -m pipeline.doctor [--config FILE] [key=value ...] [--json FILE] [--deepspeed]``
takes the configuration as ``pretrain.py`` does and prints one table in three sections:

- machine: versions, devices, usable cores, bf16 support, a warning when already loaded,
  the CPU threads a training process of the configuration will take;
- correctness on these devices: the infoNCE gather across processes equals one process
  (NCCL, one process per GPU, with two GPUs or more; otherwise two gloo processes on the
  CPU, said in the row), one bf16 step is finite and close to fp32, a checkpoint saves and
  resumes to the same next steps, DeepSpeed ZeRO-2 trains two steps (``--deepspeed``;
  on by default where a GPU exists, since on CPU it takes about a minute);
- speed for the configuration: the DIM step against its bare backbone, ``pretrain.py``
  itself for about ten seconds (on a GPU the loop around the step cost 1.6x the step),
  the input pipeline's images/s per loader worker on the configuration's own shards, and
  what follows: workers per device, whether the cores can feed the devices, epoch and
  run time on 1, 8 and 64 nodes, and the bytes the infoNCE all-gather moves per step.

Each figure is measured here, on this node, in this run, except the scaled times, which
assume linear scaling (and say so). Exit code 0 when nothing failed, 1 when a check
failed, 2 (with one line on stderr) for a mistake in the input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.core.schema import Config
from pipeline.data.shards import dataset_size
from pipeline.doctor.gather import gather_row
from pipeline.doctor.machine import machine_rows, threads_row
from pipeline.doctor.row import Row
from pipeline.doctor.runs import deepspeed_row
from pipeline.doctor.speed import default_shards, speed_rows
from pipeline.doctor.training import bf16_row, checkpoint_row

__all__ = ["main", "run_checks"]


def _guarded(section: str, check: str, fn: Callable[[], Row | list[Row]]) -> list[Row]:
    """Run one check; an unexpected error is that check's failure, not the report's end."""
    try:
        out = fn()
    except ConfigError:
        raise
    except Exception as err:  # the report shows what broke
        return [
            Row(section, check, "error", status="fail", reason=f"{type(err).__name__}: {err}"[:300])
        ]
    return out if isinstance(out, list) else [out]


def run_checks(cfg: Config, config: str | None, overrides: list[str], deepspeed: bool) -> list[Row]:
    rows = [*machine_rows(), threads_row(cfg)]
    with tempfile.TemporaryDirectory(prefix="dim-doctor-data-") as tmp:
        shards = cfg.data.train_shards or default_shards(Path(tmp) / "digits")
        rows += _guarded("correctness", "gather_with_grad", gather_row)
        rows += _guarded("correctness", "bf16 step", lambda: bf16_row(cfg))
        rows += _guarded("correctness", "checkpoint", lambda: checkpoint_row(cfg))
        rows += _guarded(
            "correctness", "deepspeed", lambda: deepspeed_row(config, overrides, shards, deepspeed)
        )
        rows += _guarded("speed", "speed", lambda: speed_rows(cfg, config, overrides, shards))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = []
    for section in ("machine", "correctness", "speed"):
        lines.append(f"== {section}")
        for r in (r for r in rows if r.section == section):
            reason = f"  ({r.reason})" if r.reason else ""
            lines.append(f"  [{r.status:<4}] {r.check:<60} {r.result}{reason}")
    return "\n".join(lines)


def to_json(rows: list[Row], wall_s: float, config: str | None, overrides: list[str]) -> dict:
    sections = {s: [] for s in ("machine", "correctness", "speed")}
    for r in rows:
        sections[r.section].append(
            {k: v for k, v in dataclasses.asdict(r).items() if k != "section"}
        )
    return {
        "config": config,
        "overrides": overrides,
        "wall_s": wall_s,
        "ok": not any(r.status == "fail" for r in rows),
        "sections": sections,
    }


class _OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line on stderr and exit code 2, like a config mistake."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _OneLineParser(
        prog="dim-doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=None, help="YAML file, as pretrain.py takes it")
    p.add_argument("--json", default=None, help="also write the report to this file")
    p.add_argument(
        "--deepspeed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the DeepSpeed ZeRO-2 check (default: on with a GPU, off on CPU: ~1 min)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_intermixed_args(argv)  # options before, between or after the overrides


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.train_shards:
            dataset_size(cfg.data.train_shards)  # shards that do not exist: a mistake, now
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise ConfigError(f"--json: folder {Path(args.json).parent} does not exist")
        deepspeed = torch.cuda.is_available() if args.deepspeed is None else args.deepspeed
        rows = run_checks(cfg, args.config, args.overrides, deepspeed)
    except ConfigError as err:
        print(f"dim-doctor: error: {err}", file=sys.stderr)
        sys.exit(2)
    wall = time.perf_counter() - t0
    print(format_table(rows))
    print(f"wall time {wall:.1f} s")
    report = to_json(rows, wall, args.config, args.overrides)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)
