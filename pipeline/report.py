"""Build a W&B Report for a set of DIM runs (wandb-workspaces Reports API).

    dim-report runs/x                      # one run folder: its W&B id, project and keys
    dim-report --project dim-pretrain --entity me --runs abc123,def456 \
        [--metrics runs/x/metrics.jsonl]
    dim-report --project dim-pretrain --entity me --group sweep1 --dry-run

Sections: MI estimates (one panel per scope and estimator), KL and loss terms, online
probe accuracy and throughput, and the evaluation table written by
``pipeline.evaluate --wandb`` (``eval/<model>/<view>/<probe>`` and ``eval/table``).
A run folder (or ``--metrics``) restricts the panels to the keys a run actually logged.
Mistakes (a missing file, no API key without ``--dry-run``) are one line and exit 2. ``--dry-run``
builds the report object and prints its structure as JSON without touching the network
(saving a report, and even serialising its run sets, needs the W&B API).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import wandb
import wandb_workspaces.reports.v2 as wr
import yaml

from pipeline.core.cli import one_line_mistakes
from pipeline.core.errors import ConfigError
from pipeline.core.files import CONFIG_FILE, METRICS, WANDB_ID
from pipeline.objective.loss import ESTIMATORS
from pipeline.share.tracking import (
    EVAL_TABLE,
    ONLINE_PROBE,
    ONLINE_PROBES,
    has_api_key,
    read_metrics,
    wandb_mode,
)

__all__ = ["build_report", "default_keys", "describe_report", "main", "panel_specs"]

SCOPES = ("global", "local")
LOSS_KEYS = ("loss", "loss/global", "loss/local", "loss/kl", "loss/score_penalty")
PROBE_KEYS = tuple(ONLINE_PROBE + name for name in ONLINE_PROBES)
THROUGHPUT_KEYS = ("samples_per_s_total", "samples_per_s")
EVAL_MODELS = {
    "dim": ("conv", "fc", "y"),
    "random_init": ("conv", "fc", "y"),
    "pixels": ("pixels",),
}
EVAL_PROBES = ("linear", "knn")


def default_keys() -> list[str]:
    """Every key a run of this pipeline may log, for reports built without a metrics file."""
    mi = [f"mi/{s}/{e}" for s in SCOPES for e in ESTIMATORS]
    return [*mi, "kl", *LOSS_KEYS, *PROBE_KEYS, *THROUGHPUT_KEYS]


def eval_keys() -> list[str]:
    return [
        f"eval/{m}/{v}/{p}" for m, views in EVAL_MODELS.items() for v in views for p in EVAL_PROBES
    ]


def panel_specs(keys: Iterable[str]) -> list[tuple[str, list[tuple[str, str, list[str]]]]]:
    """``[(section, [(kind, title, metrics), ...]), ...]`` for the logged ``keys``.

    Kept separate from the wandb objects so the layout is plain data (and testable).
    """
    keys = list(dict.fromkeys(keys))
    have = set(keys)
    mi = [
        ("line", f"MI {s} ({e})", [f"mi/{s}/{e}"])
        for s in SCOPES
        for e in ESTIMATORS
        if f"mi/{s}/{e}" in have
    ]
    objective = [
        ("line", title, [k for k in wanted if k in have])
        for title, wanted in (("KL(q(z|x) || N(0, I))", ("kl",)), ("loss terms", LOSS_KEYS))
    ]
    progress = [
        ("line", title, [k for k in wanted if k in have])
        for title, wanted in (
            ("online probe accuracy", PROBE_KEYS),
            ("throughput (samples/s)", THROUGHPUT_KEYS),
        )
    ]
    evaluation = [
        ("bar", "linear probe / k-NN accuracy", eval_keys()),
        ("table", "evaluation table", [EVAL_TABLE]),
    ]
    sections = [
        ("Mutual information estimates", mi),
        ("Objective", objective),
        ("Online probe and throughput", progress),
        ("Evaluation", evaluation),
    ]
    return [
        (name, [p for p in panels if p[2]])
        for name, panels in sections
        if any(p[2] for p in panels)
    ]


def _runset_filters(runs: list[str], group: str | None) -> str:
    parts = []
    if runs:
        parts.append("ID in [" + ", ".join(repr(r) for r in runs) + "]")
    if group:
        parts.append(f"Group = {group!r}")
    return " and ".join(parts)


def build_report(
    project: str,
    entity: str,
    *,
    runs: list[str] | None = None,
    group: str | None = None,
    title: str = "Deep InfoMax runs",
    keys: Iterable[str] | None = None,
):
    """The ``wandb_workspaces.reports.v2.Report`` object (not saved)."""

    runset = wr.Runset(
        entity=entity, project=project, name="DIM runs", filters=_runset_filters(runs or [], group)
    )
    make = {
        "line": lambda title, ys: wr.LinePlot(title=title, x="Step", y=ys),
        "bar": lambda title, ys: wr.BarPlot(title=title, metrics=ys, orientation="h"),
        "table": lambda title, ys: wr.WeavePanelSummaryTable(table_name=ys[0]),
    }
    blocks = [
        wr.P(
            "Deep InfoMax pretraining: MI estimates, objective terms, online probe, "
            "throughput, and the frozen-feature evaluation (DIM vs random init vs pixels)."
        )
    ]
    for section, panels in panel_specs(keys if keys is not None else default_keys()):
        blocks.append(wr.H2(section))
        blocks.append(
            wr.PanelGrid(runsets=[runset], panels=[make[kind](t, ys) for kind, t, ys in panels])
        )
    return wr.Report(project=project, entity=entity, title=title, blocks=blocks)


def describe_report(report) -> dict:
    """The report's structure as plain data: title, run-set filters and panels by section."""
    out = {
        "title": report.title,
        "entity": report.entity,
        "project": report.project,
        "sections": [],
    }
    section = None
    for block in report.blocks:
        kind = type(block).__name__
        if kind == "H2":
            section = {
                "heading": "".join(map(str, block.text))
                if isinstance(block.text, list)
                else str(block.text),
                "panels": [],
            }
            out["sections"].append(section)
        elif kind == "PanelGrid" and section is not None:
            section["runsets"] = [
                {"project": r.project, "filters": r.filters} for r in block.runsets
            ]
            for panel in block.panels:
                metrics = (
                    getattr(panel, "y", None)
                    or getattr(panel, "metrics", None)
                    or [getattr(panel, "table_name", "")]
                )
                section["panels"].append(
                    {
                        "type": type(panel).__name__,
                        "title": getattr(panel, "title", None),
                        "metrics": [str(m) for m in metrics],
                    }
                )
    return out


def _read_run(folder: Path) -> tuple[list[str], list[str], dict]:
    """(W&B run ids, logged keys, wandb config section) of a training run's folder."""
    if not folder.is_dir():
        raise ConfigError(f"run folder not found: {folder}")
    id_file, metrics = folder / WANDB_ID, folder / METRICS
    if not id_file.is_file():
        raise ConfigError(
            f"{folder} has no {WANDB_ID}: it is not a run folder, or its run had W&B disabled"
        )
    keys = _metric_keys(metrics) if metrics.is_file() else None
    saved = folder / CONFIG_FILE
    wandb_cfg = (
        (yaml.safe_load(saved.read_text()) or {}).get("wandb", {}) if saved.is_file() else {}
    )
    return [id_file.read_text().strip()], keys, wandb_cfg


def _metric_keys(path: Path) -> list[str]:
    if path.is_dir():
        raise ConfigError(
            f"--metrics {path} is a folder; give its metrics.jsonl, or pass the "
            f"run folder itself as the first argument"
        )
    if not path.is_file():
        raise ConfigError(f"metrics file not found: {path}")
    return sorted({k for row in read_metrics(path) for k in row})


def _default_entity() -> str:
    """The W&B entity of the logged-in user; one line when there is no key or no network."""

    if not has_api_key() or wandb_mode("auto") != "online":
        raise ConfigError(
            "no W&B API key (set WANDB_API_KEY or run `wandb login`), or "
            "WANDB_MODE is not online; --dry-run builds the report offline"
        )

    try:
        return wandb.Api().default_entity
    except Exception as err:  # network, authentication
        raise ConfigError(f"cannot reach W&B: {type(err).__name__}: {err}") from None


@one_line_mistakes("dim-report")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dim-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "run",
        nargs="?",
        default=None,
        help="a training run's output folder: its W&B id, keys and project",
    )
    p.add_argument(
        "--project", default=None, help="W&B project (default: the run's, else dim-pretrain)"
    )
    p.add_argument("--entity", default=None, help="W&B entity (default: the run's, else yours)")
    p.add_argument("--runs", default="", help="comma-separated W&B run ids")
    p.add_argument("--group", default=None, help="only runs in this W&B group")
    p.add_argument("--title", default="Deep InfoMax runs")
    p.add_argument(
        "--metrics", default=None, help="a run's metrics.jsonl: panels for its keys only"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="build and print the structure; no network"
    )
    args = p.parse_args(argv)
    print(_report(args))
    return 0


def _report(args: argparse.Namespace) -> str:
    runs, keys, wandb_cfg = ([], None, {}) if args.run is None else _read_run(Path(args.run))
    runs += [r for r in args.runs.split(",") if r]
    if args.metrics:
        keys = _metric_keys(Path(args.metrics))
    project = args.project or wandb_cfg.get("project") or "dim-pretrain"
    entity = (
        args.entity or wandb_cfg.get("entity") or ("offline" if args.dry_run else _default_entity())
    )
    report = build_report(project, entity, runs=runs, group=args.group, title=args.title, keys=keys)
    if args.dry_run:
        return json.dumps(describe_report(report), indent=2)
    try:
        report.save()
    except Exception as err:  # network, authentication, permissions
        raise ConfigError(f"cannot save the report to W&B: {type(err).__name__}: {err}") from None
    return report.url


if __name__ == "__main__":
    sys.exit(main())
