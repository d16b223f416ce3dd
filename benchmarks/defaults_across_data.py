"""Do the built-in defaults travel? ``pretrain.py`` with no ``--config`` on three kinds of
data the defaults were not tuned on, each beside a fair random init and raw pixels.

    python benchmarks/defaults_across_data.py --out runs/defaults --cifar data/cifar10

- ``digits``: scikit-learn's 1,797 8x8 digits (stored at 32 px), 70 / 30 split;
- ``canvas``: the same digits, grayscale, upscaled to 20 px and pasted at a random place
  on a 40 x 40 black canvas: white strokes on a mostly empty background, and a digit's
  position tells nothing about its class (pixels and small receptive fields suffer);
- ``cifar10``: natural colour photos (the shards of ``prepare folder ... --val-fraction
  0.1``; ``--cifar`` names their folder, skipped when absent). Probes fit on
  ``--limit-train`` training images.

Every run is exactly what a user gets: ``pretrain.py data.train_shards=... data.val_shards=...``
plus ``--set`` (nothing by default), then ``pipeline.evaluate`` with its baselines
(random init with BatchNorm statistics from the probe's training images; pixels). Prints
one markdown table of conv linear / k-NN (and MLP) per data set, with wall times and the
load average. Finished data sets (an ``eval.json``) are not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from ablation import run  # benchmarks/ is a folder of scripts, not a package

from pipeline.config import load_config
from pipeline.core.cli import comma_separated, exit_on_mistake

ROOT = Path(__file__).resolve().parents[1]
PROBES = ("linear", "mlp", "knn")
DATASETS = ("digits", "canvas", "cifar10")


def make_canvas(folder: Path, *, canvas: int = 40, digit: int = 20, seed: int = 0) -> Path:
    """Digits on a black canvas as an image folder ``folder/images/<class>/*.png``."""
    from sklearn.datasets import load_digits

    images = folder / "images"
    if images.is_dir():
        return images
    rng = np.random.default_rng(seed)
    data = load_digits()
    partial = folder / "images.partial"
    for i, (img, label) in enumerate(zip(data.images, data.target, strict=True)):
        glyph = Image.fromarray((img * 255 / 16).astype(np.uint8)).resize(
            (digit, digit), Image.BILINEAR
        )
        page = Image.new("L", (canvas, canvas))
        x, y = rng.integers(0, canvas - digit + 1, size=2)
        page.paste(glyph, (int(x), int(y)))
        out = partial / str(label)
        out.mkdir(parents=True, exist_ok=True)
        page.save(out / f"{i:04d}.png")
    partial.rename(images)
    return images


def prepare(name: str, args) -> Path | None:
    """The data set's shard folder (train.json / val.json), written once."""
    py = sys.executable
    if name == "cifar10":
        return args.cifar if (args.cifar / "train.json").is_file() else None
    shards = args.out / name / "shards"
    if (shards / "train.json").is_file():
        return shards
    shards.parent.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        source = ["digits"]
    else:
        source = ["folder", str(make_canvas(args.out / name))]
    cmd = [py, "-m", "pipeline.prepare", *source, str(shards), "--val-fraction", "0.3"]
    run(cmd, args.out / name / "prepare.log")
    return shards


def train_and_evaluate(name: str, shards: Path, args) -> dict:
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    result_file, timing_file = folder / "eval.json", folder / "timing.json"
    if result_file.is_file() and timing_file.is_file():
        return {
            "results": json.loads(result_file.read_text()),
            **json.loads(timing_file.read_text()),
        }
    py = sys.executable
    train, val = str(shards / "train.json"), str(shards / "val.json")
    train_s = run(
        [
            py,
            "pretrain.py",
            f"data.train_shards={train}",
            f"data.val_shards={val}",
            f"train.output_dir={folder / 'run'}",
            "wandb.mode=disabled",
            *args.set,
        ],
        folder / "train.log",
    )
    load = os.getloadavg()[0]
    limit = ["--limit-train", str(args.limit_train)] if name == "cifar10" else []
    evaluate = [py, "-m", "pipeline.evaluate", "--checkpoint", str(folder / "run"), *limit]
    eval_s = run(
        [*evaluate, "--train-shards", train, "--test-shards", val, "--json", str(result_file)],
        folder / "eval.log",
    )
    timing = {"train_s": train_s, "eval_s": eval_s, "load": load}
    timing_file.write_text(json.dumps(timing, indent=2))
    print(f"[defaults] {name}: trained {train_s:.0f}s, evaluated {eval_s:.0f}s", flush=True)
    return {"results": json.loads(result_file.read_text()), **timing}


def row(name: str, found: dict) -> str:
    r = found["results"]
    cells = []
    for model, view in (("dim", "conv"), ("random_init", "conv"), ("pixels", "pixels")):
        cells += [f"{100 * r[model][view][p]:.1f}" for p in PROBES]
    ahead = all(
        r["dim"]["conv"][p] > max(r["random_init"]["conv"][p], r["pixels"]["pixels"][p])
        for p in ("linear", "knn")
    )
    times = f"{found['train_s']:.0f} / {found['eval_s']:.0f}"
    return (
        f"| {name} | "
        + " | ".join(cells)
        + f" | {'yes' if ahead else 'NO'} | {times} | {found['load']:.1f} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs/defaults")
    p.add_argument("--cifar", type=Path, default=ROOT / "data/cifar10")
    p.add_argument(
        "--only",
        type=comma_separated(choices=DATASETS, kind="data set"),
        default=",".join(DATASETS),
        help="comma list of data sets",
    )
    p.add_argument("--limit-train", type=int, default=10000, help="CIFAR probe-training images")
    p.add_argument("--set", nargs="*", default=[], help="overrides for every run (default none)")
    args = p.parse_args(argv)
    load_config(None, args.set)  # a typo in --set: one line before any data is written
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| data | DIM linear | DIM mlp | DIM k-NN | random linear | random mlp | random k-NN "
        "| pixels linear | pixels mlp | pixels k-NN | DIM ahead (linear, k-NN) "
        "| train / eval s | load |",
        "|" + "---|" * 13,
    ]
    for name in args.only:
        shards = prepare(name, args)
        if shards is None:
            print(f"[defaults] {name}: no shards at {args.cifar}, skipped", flush=True)
            continue
        lines.append(row(name, train_and_evaluate(name, shards, args)))
    command = " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join(lines) + (
        f"\n\nConv view; {os.cpu_count()} CPUs. "
        f"Command: `python benchmarks/defaults_across_data.py {command}`"
    )
    (args.out / "results.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    exit_on_mistake("defaults_across_data.py", main)
