"""The DIM ablation at CPU scale: DIM(G), DIM(L), DIM(G+L) x JSD / DV / infoNCE, then
the best of those with the KL prior switched on (the shipped configs leave it off), with
one view instead of two, and with narrower or linear critic embeddings. Every row trains the
same number of steps from the same base config and is evaluated the same way
(pipeline.evaluate: conv / fc / y x linear / mlp / k-NN, probes fit on ``--limit-train``
training images, scored on the held-out split).

    python benchmarks/ablation.py --base configs/cifar10_cpu.yaml --steps 300 \\
        --out runs/ablation --markdown docs/results.md

Rows already trained (an export in their folder) are only re-evaluated when their
``eval.json`` is missing, so an interrupted ablation picks up where it stopped.
``--markdown`` rewrites the block between the ablation markers of that file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.core.cli import exit_on_mistake, refused
from pipeline.data.shards import resolve_shards

ROOT = Path(__file__).resolve().parents[1]
SCOPES = {  # (alpha, beta, global critic, local critic)
    "G": ["loss.alpha=1.0", "loss.beta=0.0", "loss.global_critic=dot", "loss.local_critic=none"],
    "L": ["loss.alpha=0.0", "loss.beta=1.0", "loss.global_critic=none", "loss.local_critic=dot"],
    "G+L": ["loss.alpha=0.5", "loss.beta=1.0", "loss.global_critic=dot", "loss.local_critic=dot"],
}
ESTIMATORS = ("jsd", "dv", "infonce")
VARIANTS = {  # applied on top of the best of the nine rows
    "prior on (gamma 0.1)": ["loss.gamma=0.1"],
    "one view": ["data.augment=simple"],
    "narrow critic (64/128)": ["loss.critic_dim=64", "loss.critic_hidden=128"],
    "linear critic (64/0)": ["loss.critic_dim=64", "loss.critic_hidden=0"],
}
VIEWS, PROBES = ("conv", "fc", "y"), ("linear", "mlp", "knn")
START, END = "<!-- ablation:start -->", "<!-- ablation:end -->"


def run(cmd: list[str], log: Path) -> float:
    """Run one command, its output to ``log``; returns the wall time in seconds. A command
    that refused its input (exit code 2) is a ``ConfigError`` carrying its error line."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code == 2:
        raise refused(log.read_text(errors="replace"), f" (log: {log})")
    if code != 0:
        sys.exit(f"ablation: {' '.join(cmd[:4])} ... failed with exit code {code}; see {log}")
    return time.perf_counter() - t0


def check_inputs(args) -> None:
    """Every row's config and both shard specs, before the first row trains: a typo in
    ``--set`` is one line now, not a failure after an hour of rows. Relative paths are
    read from the repository root, as the rows' commands read them."""
    with contextlib.chdir(ROOT):
        for overrides in [*SCOPES.values(), *VARIANTS.values()]:
            load_config(args.base, [*args.set, *overrides])
        for spec in (args.train_shards, args.test_shards):
            resolve_shards(spec)


def train_and_evaluate(name: str, overrides: list[str], args, baselines: bool = False) -> dict:
    folder = args.out / "".join(c if c.isalnum() else "_" for c in name.replace("+", "p"))
    folder.mkdir(parents=True, exist_ok=True)
    result_file = folder / "eval.json"
    timing_file = folder / "timing.json"
    if result_file.is_file() and timing_file.is_file():
        return {
            "results": json.loads(result_file.read_text()),
            **json.loads(timing_file.read_text()),
        }
    py = sys.executable
    train_s = run(
        [
            py,
            "pretrain.py",
            "--config",
            str(args.base),
            f"train.output_dir={folder}",
            f"train.max_steps={args.steps}",
            "train.eval_every=0",
            "wandb.mode=disabled",
            *args.set,
            *overrides,
        ],
        folder / "train.log",
    )
    eval_cmd = [
        py,
        "-m",
        "pipeline.evaluate",
        "--checkpoint",
        str(folder),
        "--train-shards",
        args.train_shards,
        "--test-shards",
        args.test_shards,
        "--json",
        str(result_file),
        "--limit-train",
        str(args.limit_train),
    ]
    eval_s = run(eval_cmd + ([] if baselines else ["--no-baselines"]), folder / "eval.log")
    timing = {"train_s": train_s, "eval_s": eval_s, "overrides": overrides}
    timing_file.write_text(json.dumps(timing, indent=2))
    print(f"[ablation] {name}: trained {train_s:.0f}s, evaluated {eval_s:.0f}s", flush=True)
    return {"results": json.loads(result_file.read_text()), **timing}


def score(results: dict) -> float:
    """What picks the best row: the conv view, mean of linear and k-NN accuracy."""
    conv = results["dim"]["conv"]
    return (conv["linear"] + conv["knn"]) / 2


def _cells(results: dict, model: str) -> list[str]:
    """One row's accuracies in table order; pixels have one view, under conv."""
    views = results[model]
    if model == "pixels":
        views = {"conv": views["pixels"]}
    return [
        "" if views.get(v, {}).get(p) is None else f"{100 * views[v][p]:.1f}"
        for v in VIEWS
        for p in PROBES
    ]


def table(rows: dict[str, dict]) -> str:
    head = "| row | " + " | ".join(f"{v} {p}" for v in VIEWS for p in PROBES) + " | train s |"
    lines = [head, "|" + "---|" * (len(VIEWS) * len(PROBES) + 2)]
    for name, row in rows.items():
        model = name.replace(" ", "_") if name in ("random init", "pixels") else "dim"
        train = f"{row['train_s']:.0f}" if "train_s" in row else ""
        lines.append(f"| {name} | " + " | ".join(_cells(row["results"], model)) + f" | {train} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", type=Path, default=ROOT / "configs/cifar10_cpu.yaml")
    p.add_argument("--steps", type=int, default=300, help="training steps of every row")
    p.add_argument("--out", type=Path, default=ROOT / "runs/ablation")
    p.add_argument("--train-shards", default="data/cifar10/train.json")
    p.add_argument("--test-shards", default="data/cifar10/val.json")
    p.add_argument("--limit-train", type=int, default=5000, help="probe-training images")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every row")
    p.add_argument(
        "--markdown", type=Path, default=None, help="file whose ablation block to rewrite"
    )
    args = p.parse_args(argv)
    check_inputs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for scope, scope_overrides in SCOPES.items():
        for estimator in ESTIMATORS:
            name = f"DIM({scope}) {estimator}"
            rows[name] = train_and_evaluate(
                name, [f"loss.estimator={estimator}", *scope_overrides], args, baselines=not rows
            )
    best = max(rows, key=lambda n: score(rows[n]["results"]))
    first = rows[next(iter(rows))]["results"]
    baselines = {
        "random init": {"results": {"random_init": first["random_init"]}},
        "pixels": {"results": {"pixels": first["pixels"]}},
    }
    for variant, extra in VARIANTS.items():
        rows[f"{best}, {variant}"] = train_and_evaluate(
            f"{best}, {variant}", [*rows[best]["overrides"], *extra], args
        )
    # Wall time of every row's training and evaluation (rows cached from an earlier,
    # interrupted invocation count with the time they took then).
    total = sum(r["train_s"] + r["eval_s"] for r in rows.values())

    body = table({**rows, **baselines})
    load = os.getloadavg()
    base = args.base.relative_to(ROOT) if args.base.is_absolute() else args.base
    command = " ".join(argv if argv is not None else sys.argv[1:])
    report = (
        f"{START}\n{body}\n\nBest of the nine rows (conv, mean of linear and k-NN): **{best}**. "
        f"{args.steps} steps per row from `{base}`"
        f"{' with ' + ' '.join(args.set) if args.set else ''}; probes fit on {args.limit_train} "
        f"training images, scored on `{args.test_shards}`. Machine: {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other jobs shared it: wall times compare "
        f"rows only roughly); training and evaluation of all rows {total / 60:.0f} min.\n"
        f"Command: `python benchmarks/ablation.py {command}`\n{END}"
    )
    (args.out / "results.md").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps(rows | baselines, indent=2) + "\n")
    print(report)
    if args.markdown is not None:
        text = args.markdown.read_text() if args.markdown.is_file() else ""
        if START in text and END in text:
            text = text[: text.index(START)] + report + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip() + "\n\n" + report + "\n"
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    exit_on_mistake("ablation.py", main)
