"""``dim-prepare`` / ``python -m pipeline.prepare``: image folders, the bundled digits or a
torchvision dataset on disk -> WebDataset shards and manifests (``pipeline.data.write``).

    python -m pipeline.prepare folder  SRC_DIR OUT_DIR   # SRC_DIR/<class>/*.jpg -> labels 0..K-1
    python -m pipeline.prepare folder  SRC_DIR OUT_DIR --max-size 256   # stored resized
    python -m pipeline.prepare digits  OUT_DIR           # scikit-learn's bundled 8x8 digits
    python -m pipeline.prepare torchvision CIFAR10 ROOT OUT_DIR [--split train|test]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.core.cli import one_line_mistakes
from pipeline.core.errors import ConfigError
from pipeline.core.files import check_output_folder
from pipeline.data import write
from pipeline.data.shards import read_manifest
from pipeline.data.write import (
    SHARD_BYTES,
    SHARD_SAMPLES,
    prepare_digits,
    prepare_folder,
    prepare_torchvision,
)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of samples in the val split (default 0.1; 0: none)",
    )
    common.add_argument("--seed", type=int, default=0, help="seed of the split permutation")
    common.add_argument(
        "--shard-samples",
        type=int,
        default=SHARD_SAMPLES,
        help=f"max samples per shard (default {SHARD_SAMPLES})",
    )
    common.add_argument(
        "--shard-mb",
        type=float,
        default=SHARD_BYTES / 2**20,
        help=f"max MiB per shard (default {SHARD_BYTES // 2**20})",
    )
    common.add_argument(
        "--names",
        default="train,val",
        help="names of the two splits (default train,val), e.g. test,unused",
    )
    common.add_argument("--force", action="store_true", help="rewrite an existing output")
    resize = argparse.ArgumentParser(add_help=False)
    resize.add_argument(
        "--max-size",
        type=int,
        default=None,
        metavar="N",
        help="store images with the shorter side at most N pixels, aspect kept (never "
        "upscaled); reports the bytes and decode time saved",
    )
    parser = argparse.ArgumentParser(
        prog="dim-prepare",
        description=write.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="source", required=True)
    folder = sub.add_parser(
        "folder", parents=[common, resize], help="image folder tree (class subfolders)"
    )
    folder.add_argument("src")
    folder.add_argument("out")
    digits = sub.add_parser("digits", parents=[common], help="scikit-learn's bundled digits")
    digits.add_argument("out")
    digits.add_argument(
        "--size", type=int, default=32, help="side in pixels (8: native; default 32)"
    )
    tv = sub.add_parser("torchvision", parents=[common, resize], help="torchvision dataset on disk")
    tv.add_argument("name", help="class in torchvision.datasets, e.g. CIFAR10")
    tv.add_argument("root", help="the dataset's root folder (never downloaded)")
    tv.add_argument("out")
    tv.add_argument("--split", default="train", help="the dataset's own split (default train)")
    tv.add_argument("--format", default="png", help="png (default), jpg or webp")
    return parser


def check_args(args: argparse.Namespace) -> tuple[str, str]:
    """Every option in range and the output folder writable, before anything is read or
    written; returns the two split names."""
    names = tuple(args.names.split(","))
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise ConfigError(f"--names takes two different comma-separated names, got {args.names!r}")
    if not 0 <= args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.shard_samples < 1 or args.shard_mb <= 0:
        raise ConfigError(
            f"--shard-samples and --shard-mb must be > 0, got {args.shard_samples} and "
            f"{args.shard_mb}"
        )
    if getattr(args, "max_size", None) is not None and args.max_size < 1:
        raise ConfigError(f"--max-size must be a positive number of pixels, got {args.max_size}")
    if args.source == "digits" and args.size < 8:
        raise ConfigError(f"--size must be >= 8 (the digits' native side), got {args.size}")
    if args.source == "torchvision" and args.format not in ("png", "jpg", "webp"):
        raise ConfigError(f"--format must be png, jpg or webp, got {args.format!r}")
    check_output_folder(args.out, "OUT", example="data/mydata")
    return names


@one_line_mistakes("dim-prepare")
def main(argv: list[str] | None = None) -> int:
    """Console entry point: a mistake is one line on stderr and exit code 2, with nothing
    written."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    names = check_args(args)
    common = {
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "overwrite": args.force,
        "max_samples": args.shard_samples,
        "max_bytes": int(args.shard_mb * 2**20),
        "names": names,
    }
    if args.source == "folder":
        manifest = prepare_folder(args.src, args.out, max_size=args.max_size, **common)
    elif args.source == "digits":
        manifest = prepare_digits(args.out, size=args.size, **common)
    else:
        manifest = prepare_torchvision(
            args.name,
            args.root,
            args.out,
            split=args.split,
            image_format=args.format,
            max_size=args.max_size,
            **common,
        )
    folder = Path(args.out)
    for path in sorted(folder.glob("*.json")):
        try:
            m = read_manifest(path)
        except ConfigError:
            continue
        print(
            f"{path}: {m.num_samples} samples in {len(m.shards)} shards, {len(m.classes)} classes"
        )
    print(f"train with: data.train_shards={manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
