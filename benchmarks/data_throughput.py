"""Decoded + augmented images/s of the training stream with 0, 1 and 2 DataLoader workers.

``--augment-on worker`` augments each image in the loader (torchvision.transforms.v2);
``--augment-on batch`` (the default, as ``data.augment_on``) has the loader decode only
and times ``pipeline.data.batch_augment`` on each batch in this process, as the train loop does.

The data: the CIFAR-10 training images as an image folder (``train/<class>/*.jpg``, 50,000
32x32 JPEGs), extracted to a temporary folder and written as shards by the project's own
writer (``pipeline.prepare.prepare_folder``), then read back by ``pipeline.data.train_loader``.

    .venv/bin/python benchmarks/data_throughput.py [--tar ../shared/data/cifar10-train-jpg.tar]
        [--workers 0,1,2] [--batch-size 256] [--batches 40] [--augment simple]
        [--color-jitter 0.4] [--augment-on batch|worker]

The first batch of each run (worker start-up, filling the shuffle buffer) is not timed.
"""

from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
import time
from itertools import islice
from pathlib import Path

from pipeline.core.cli import comma_separated, exit_on_mistake
from pipeline.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAR = ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar"


def measure(manifest: Path, workers: int, args: argparse.Namespace) -> float:
    """Images per second over ``args.batches`` batches after one warm-up batch."""
    from pipeline.core.schema import DataConfig
    from pipeline.data.batch_augment import build_batch_augment
    from pipeline.data.loaders import train_loader

    cfg = DataConfig(
        train_shards=str(manifest),
        num_workers=workers,
        augment=args.augment,
        color_jitter=args.color_jitter,
        augment_on=args.augment_on,
    )
    loader = train_loader(
        cfg,
        batch_size=args.batch_size,
        img_size=args.img_size,
        in_chans=3,
        seed=0,
        rank=0,
        world_size=1,
    )
    augment = build_batch_augment(cfg, img_size=args.img_size, seed=0, rank=0)
    batches = iter(loader)
    next(batches)
    start, images = time.perf_counter(), 0
    for step, batch in enumerate(islice(batches, args.batches)):
        if augment is not None:
            augment(batch["image"], step)
        images += len(batch["label"])
    rate = images / (time.perf_counter() - start)
    loader.close()
    return rate


def cifar_shards(tar: Path, tmp: Path) -> Path:
    """Extract the CIFAR-10 image-folder tar into ``tmp`` and write it as shards there."""
    from pipeline.data.write import prepare_folder

    start = time.perf_counter()
    with tarfile.open(tar) as archive:
        archive.extractall(tmp, filter="data")
    folder = Path(tmp) / "train"
    n = sum(1 for _ in folder.rglob("*.jpg"))
    print(f"extracted {n} images in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    manifest = prepare_folder(folder, Path(tmp) / "shards", val_fraction=0.0)
    took = time.perf_counter() - start
    print(f"wrote shards in {took:.1f} s ({n / took:,.0f} images/s): {manifest}")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tar", type=Path, default=DEFAULT_TAR, help="CIFAR-10 image-folder tar")
    parser.add_argument("--workers", type=comma_separated(int), default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    parser.add_argument("--augment", default="simple", choices=("none", "simple", "amdim"))
    parser.add_argument("--color-jitter", type=float, default=0.4, help="0 disables")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--augment-on", default="batch", choices=("batch", "worker"))
    args = parser.parse_args(argv)
    if not args.tar.is_file():
        raise ConfigError(
            f"{args.tar} not found: --tar takes a tar of CIFAR-10-like class folders, "
            f"train/<class>/*.jpg"
        )
    with tempfile.TemporaryDirectory(prefix="dim-bench-") as tmp:
        manifest = cifar_shards(args.tar, Path(tmp))
        print(
            f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, "
            f"batch {args.batch_size}, augment {args.augment} on {args.augment_on}, "
            f"color_jitter {args.color_jitter}, img_size {args.img_size}"
        )
        print("workers  images/s")
        for workers in args.workers:
            print(f"{workers:7d}  {measure(manifest, workers, args):8,.0f}", flush=True)


if __name__ == "__main__":
    exit_on_mistake("data_throughput.py", main)
