"""Training img/s alone and beside one busy process, with torch's default threads and with
the pipeline's choice (``pipeline.train.threads``), all in one run.

    python benchmarks/threads.py --config configs/cifar10_cpu.yaml --shards data/cifar10/train.json
    python benchmarks/threads.py --config none --window 2 --windows 1   # smoke test, digits

Each cell is a real ``pretrain.py`` run (its loader workers included) in a fresh process,
since OpenMP reads its wait policy only when torch loads: ``train.max_steps`` =
``window`` x (1 + ``windows``), a row logged every ``window`` steps; the first window is
the warm-up (start-up, the shuffle buffer filling), the img/s is that of the other
windows together (their images over their time). Settings (``--settings``):

- ``before``: torch's defaults written out, so the choice keeps them: ``OMP_NUM_THREADS``
  = the cores in the affinity mask, ``GOMP_SPINCOUNT=300000`` (libgomp's spin when no
  policy is set, as ``OMP_DISPLAY_ENV=verbose`` shows);
- ``after``: nothing set: the pipeline chooses (and restarts itself for the policy if it
  needs one);
- ``passive``: ``before``'s thread count with ``OMP_WAIT_POLICY=PASSIVE`` (the policy
  alone, without the thread choice).

Loads (``--loads``): ``alone``, and ``busy``: one process spinning on one core (started
before the run, stopped after it). ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY`` and
``GOMP_SPINCOUNT`` from the calling shell are dropped: each setting says its own. The
table gives the load average (1 min) before each cell: other jobs on the machine count.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.cli import comma_separated, exit_on_mistake, refused  # noqa: E402
from pipeline.share.tracking import read_metrics  # noqa: E402  (after the path)

CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "DIM_THREADS_RESTARTED")
LIBGOMP_DEFAULT_SPIN = "300000"


def settings(cores: int) -> dict[str, dict[str, str]]:
    """Setting name -> the environment it adds."""
    return {
        "before": {"OMP_NUM_THREADS": str(cores), "GOMP_SPINCOUNT": LIBGOMP_DEFAULT_SPIN},
        "after": {},
        "passive": {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"},
    }


def spin() -> subprocess.Popen:
    """One process keeping one core busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def timed_rates(rows: list[dict], window: int) -> list[float]:
    """img/s of each timed window (the rows after the first)."""
    return [r["samples_per_s_total"] for r in rows if r["step"] > window]


def run_cell(args, extra: dict[str, str], out: Path, busy: bool) -> tuple[float, list[float], str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED} | extra
    env |= {"WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    steps = args.window * (1 + args.windows)
    cmd = [
        sys.executable,
        str(ROOT / "pretrain.py"),
        *(["--config", args.config] if args.config else []),
        *([f"data.train_shards={args.shards}"] if args.shards else []),
        "data.val_shards=",
        f"train.max_steps={steps}",
        f"train.log_every={args.window}",
        f"train.save_every={steps}",
        "train.warmup_steps=0",
        "train.eval_every=0",
        f"train.output_dir={out}",
        "wandb.mode=disabled",
        *args.overrides,
    ]
    load = spin() if busy else None
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    finally:
        if load is not None:
            load.kill()
            load.wait()
    if proc.returncode == 2:  # pretrain.py refused the config: its one line
        raise refused(proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"benchmarks/threads.py: the run failed:\n{proc.stderr[-3000:]}")
    said = next((x for x in proc.stdout.splitlines() if x.startswith("threads: ")), "?")
    rates = timed_rates(read_metrics(out / "metrics.jsonl"), args.window)
    # Equal windows: their images over their time is the harmonic mean of their rates.
    return len(rates) / sum(1 / r for r in rates), rates, said


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--config",
        default=str(ROOT / "configs/cifar10_cpu.yaml"),
        help="YAML config; none: pretrain.py's embedded defaults (the digits)",
    )
    p.add_argument("--shards", default=None, help="data.train_shards (default: the config's)")
    p.add_argument("--window", type=int, default=20, help="steps per logged window")
    p.add_argument("--windows", type=int, default=3, help="timed windows after the warm-up")
    p.add_argument(
        "--settings",
        type=comma_separated(choices=tuple(settings(1)), kind="setting"),
        default="before,after",
        help="before,after[,passive]",
    )
    p.add_argument(
        "--loads",
        type=comma_separated(choices=("alone", "busy"), kind="load"),
        default="alone,busy",
        help="alone,busy",
    )
    p.add_argument("overrides", nargs="*", help="more key=value overrides")
    args = p.parse_intermixed_args(argv)
    if args.config == "none":
        args.config = None  # the embedded defaults (digits)
    cores = len(os.sched_getaffinity(0))
    table = settings(cores)
    print(
        f"{args.config or 'default config'}  {cores} cores in the affinity mask  "
        f"{args.window} steps x {args.windows} timed windows after 1 warm-up window"
    )
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dim-threads-") as tmp:
        for load in args.loads:
            for name in args.settings:
                avg = os.getloadavg()[0]
                rate, rates, said = run_cell(
                    args, table[name], Path(tmp) / f"{name}-{load}", load == "busy"
                )
                results.append((load, name, avg, rate, rates, said))
                print(f"  {load:<5} {name:<7} {rate:7.1f} img/s  (load {avg:.2f})", flush=True)
    print()
    print("| load | setting | img/s | per window | load avg before | the run's threads line |")
    print("|---|---|---|---|---|---|")
    for load, name, avg, rate, rates, said in results:
        line = re.sub(r"^threads: ", "", said)
        windows = " / ".join(f"{r:.0f}" for r in rates)
        print(f"| {load} | {name} | {rate:.1f} | {windows} | {avg:.2f} | {line} |")
    print(
        f"\nwall {time.perf_counter() - t0:.0f} s; load average now "
        f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    exit_on_mistake("threads.py", main)
