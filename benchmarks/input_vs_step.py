"""Does the input pipeline keep up? Input images/s against the images/s the step consumes.

For one shipped config (its model, loss, batch size and data settings, with
``data.augment`` overridable, default two views) and each place the augmentation can
run (``data.augment_on``: ``worker``, per-image PIL-free v2 transforms in the loader;
``batch``, the loader only decodes and ``pipeline.data.batch_augment`` augments the batch):

- input: images/s of the loader with the config's ``data.num_workers``, plus the batched
  augmentation where it applies (timed in this process, as the train loop runs it);
- step: images/s of the DIM step alone (forward + backward + AdamW) on ready batches;
- end to end: images/s of loader -> augmentation -> step in one loop, as in
  ``pipeline/train/loop.py`` (without its logging and checkpoints).

    OMP_NUM_THREADS=1 python benchmarks/input_vs_step.py --config configs/cifar10_cpu.yaml \
        --shards data/cifar10/train.json [--augment amdim] [--batches 20] [--steps 6]
    OMP_NUM_THREADS=1 python benchmarks/input_vs_step.py --config configs/digits.yaml

Without ``--shards``: the CIFAR-10 config builds shards from
``../shared/data/cifar10-train-jpg.tar`` (as ``data_throughput.py``), the digits config
writes the digits shards to a temporary folder. One image = one source image (its two
views count once), so input and step figures compare directly.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from pipeline.core.cli import comma_separated, exit_on_mistake

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]


def make_shards(config: str, tmp: str, tar: Path) -> str:
    if "digits" in Path(config).name:
        from pipeline.data.write import prepare_digits

        return str(prepare_digits(Path(tmp) / "digits", val_fraction=0.3))
    from data_throughput import cifar_shards

    return str(cifar_shards(tar, Path(tmp)))


def build(cfg, *, rank: int = 0):
    from pipeline.data.batch_augment import build_batch_augment
    from pipeline.data.loaders import train_loader

    loader = train_loader(
        cfg.data,
        batch_size=cfg.train.batch_size,
        img_size=cfg.model.img_size,
        in_chans=cfg.model.in_chans,
        seed=0,
        rank=rank,
        world_size=1,
    )
    augment = build_batch_augment(cfg.data, img_size=cfg.model.img_size, seed=0, rank=rank)
    return loader, augment


def views_of(batch: dict, augment, step: int) -> list[torch.Tensor]:
    from pipeline.data.loaders import batch_views

    if augment is None:
        return batch_views(batch)
    return augment(batch["image"], step)


def input_rate(cfg, batches: int) -> float:
    """Source images/s of loader (+ batched augmentation), after one untimed batch."""
    loader, augment = build(cfg)
    it = iter(loader)
    views_of(next(it), augment, 0)
    start, images = time.perf_counter(), 0
    for step, batch in enumerate(islice(it, batches), 1):
        views_of(batch, augment, step)
        images += len(batch["label"])
    rate = images / (time.perf_counter() - start)
    loader.close()
    return rate


def make_step(cfg):
    from pipeline.models.speed import apply_speed_options, in_model_layout
    from pipeline.objective.model import build_model

    torch.manual_seed(0)
    model = apply_speed_options(build_model(cfg).train(), cfg.train)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(views):
        loss, _ = model(*(in_model_layout(v, cfg.train) for v in views))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def step_rate(cfg, steps: int, warmup: int = 2) -> float:
    """Source images/s of the DIM step on one fixed, already augmented batch."""
    loader, augment = build(cfg)
    batch = next(iter(loader))
    loader.close()
    views = views_of(batch, augment, 0)
    step = make_step(cfg)
    for _ in range(warmup):
        step(views)
    start = time.perf_counter()
    for _ in range(steps):
        step(views)
    return cfg.train.batch_size * steps / (time.perf_counter() - start)


def end_to_end(cfg, steps: int, warmup: int = 2) -> float:
    loader, augment = build(cfg)
    it, step = iter(loader), make_step(cfg)
    for i in range(warmup):
        step(views_of(next(it), augment, i))
    start = time.perf_counter()
    for i in range(steps):
        step(views_of(next(it), augment, warmup + i))
    rate = cfg.train.batch_size * steps / (time.perf_counter() - start)
    loader.close()
    return rate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/cifar10_cpu.yaml")
    p.add_argument("--shards", default=None, help="train shards (default: built, see above)")
    p.add_argument(
        "--tar", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar"
    )
    p.add_argument("--augment", default="amdim", choices=("none", "simple", "amdim"))
    p.add_argument(
        "--places",
        type=comma_separated(choices=("worker", "batch"), kind="data.augment_on"),
        default="worker,batch",
        help="data.augment_on values to compare",
    )
    p.add_argument("--batches", type=int, default=20, help="timed loader batches")
    p.add_argument("--steps", type=int, default=6, help="timed steps (step alone, end to end)")
    p.add_argument("overrides", nargs="*", help="more config overrides (train.compile=true, ...)")
    args = p.parse_args(argv)
    from pipeline.config import load_config
    from pipeline.models.speed import keep_freed_memory

    kept = keep_freed_memory(load_config(args.config, args.overrides).train.keep_freed_memory)
    with tempfile.TemporaryDirectory(prefix="dim-bench-") as tmp:
        shards = args.shards or make_shards(args.config, tmp, args.tar)
        print(
            f"{args.config}  augment={args.augment}  threads={torch.get_num_threads()}  "
            f"keep_freed_memory={kept}  load average {os.getloadavg()[0]:.1f}  "
            f"{' '.join(args.overrides)}"
        )
        print(
            f"{'augment_on':<11}{'workers':>8}{'batch':>6}{'input img/s':>13}"
            f"{'step img/s':>12}{'input/step':>11}{'end-to-end img/s':>18}"
        )
        for place in args.places:
            cfg = load_config(
                args.config,
                [
                    f"data.train_shards={shards}",
                    "data.val_shards=",
                    f"data.augment={args.augment}",
                    f"data.augment_on={place}",
                    *args.overrides,
                ],
            )
            fed = input_rate(cfg, args.batches)
            used = step_rate(cfg, args.steps)
            e2e = end_to_end(cfg, args.steps)
            print(
                f"{place:<11}{cfg.data.num_workers:>8}{cfg.train.batch_size:>6}{fed:>13,.0f}"
                f"{used:>12,.1f}{fed / used:>11.1f}{e2e:>18,.1f}  "
                f"(load {os.getloadavg()[0]:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    exit_on_mistake("input_vs_step.py", main)
