"""Write WebDataset shards and JSON manifests (the library behind ``python -m pipeline.prepare``).

    python -m pipeline.prepare folder  SRC_DIR OUT_DIR   # SRC_DIR/<class>/*.jpg -> labels 0..K-1
    python -m pipeline.prepare folder  SRC_DIR OUT_DIR --max-size 256   # stored resized
    python -m pipeline.prepare digits  OUT_DIR           # scikit-learn's bundled 8x8 digits
    python -m pipeline.prepare torchvision CIFAR10 ROOT OUT_DIR [--split train|test]

Each writes ``OUT_DIR/{train,val}-NNNNNN.tar`` (a fixed fraction goes to ``val``, chosen by
a seeded permutation, so the split is the same every time) and one manifest per split,
``OUT_DIR/train.json`` and ``OUT_DIR/val.json``: shard names, samples per shard, class
names. Samples are ``{key}.{jpg|jpeg|png|webp}`` plus ``{key}.cls`` (the integer label),
the layout webdataset's ShardWriter and img2dataset produce. Shards are written in a
temporary folder and moved in place, manifests last: a manifest means a finished split.
``--max-size N`` (folder, torchvision) stores images with the shorter side at most N.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.datasets as tvd
import webdataset as wds
from PIL import Image
from torchvision.io import decode_image
from tqdm import tqdm

from pipeline.core.errors import ConfigError
from pipeline.data.digits import digits_tensor
from pipeline.data.shards import read_manifest, write_manifest

log = logging.getLogger(__name__)

FOLDER_EXTS = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}
SHARD_SAMPLES = 10_000  # default maximum samples per shard
SHARD_BYTES = 256 * 2**20  # default maximum bytes per shard (a shard may pass it by one sample)

DECODE_SAMPLE = 20  # resized images whose decode time prepare compares with their source's
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}

# One sample source: how many items, and item index -> (image bytes, extension, label or -1).
Loader = Callable[[int], tuple[bytes, str, int]]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: a seeded permutation, the first ``round(n * val_fraction)`` to val.
    Both come out shuffled, so shards mix classes even when the source is sorted by class."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(n * val_fraction)
    return order[n_val:], order[:n_val]


def _write_split(
    load: Loader,
    indices: Sequence[int],
    out_dir: Path,
    tmp: Path,
    name: str,
    *,
    classes: list[str],
    max_samples: int,
    max_bytes: int,
    info: dict,
) -> Path:
    """Shards of one split into ``tmp`` (then moved to ``out_dir``); returns its manifest."""
    written: list[tuple[str, int, int]] = []
    writer: wds.ShardWriter

    def done(fname: str) -> None:  # ShardWriter calls this as it closes each shard
        written.append((Path(fname).name, writer.count, os.path.getsize(fname)))

    writer = wds.ShardWriter(
        str(tmp / f"{name}-%06d.tar"),
        maxcount=max_samples,
        maxsize=max_bytes,
        post=done,
        verbose=0,
        mtime=0,
    )
    with writer:
        for i, index in enumerate(tqdm(indices, desc=f"{name} shards", unit="img")):
            data, ext, label = load(int(index))
            sample: dict[str, Any] = {"__key__": f"{name}-{i:08d}", ext: data}
            if label >= 0:
                sample["cls"] = str(label).encode()
            writer.write(sample)
    for shard, _, _ in written:
        os.replace(tmp / shard, out_dir / shard)
    return write_manifest(
        out_dir / f"{name}.json", split=name, shards=written, classes=classes, info=info
    )


def write_dataset(
    load: Loader,
    n: int,
    out_dir: str | Path,
    *,
    classes: list[str],
    val_fraction: float = 0.1,
    seed: int = 0,
    max_samples: int = SHARD_SAMPLES,
    max_bytes: int = SHARD_BYTES,
    names: tuple[str, str] = ("train", "val"),
    source: dict | None = None,
) -> dict[str, Path]:
    """Split ``n`` items, write each non-empty split's shards and manifest; {split: manifest}.

    Old shards of the same split names are removed first, so a brace pattern or glob over
    the folder never mixes two runs.
    """
    if n == 0:
        raise ConfigError("nothing to write: the source has no images")
    parts = dict(zip(names, split_indices(n, val_fraction, seed), strict=True))
    if not len(parts[names[0]]):
        raise ConfigError(f"val_fraction={val_fraction} leaves no sample of {n} for {names[0]!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        for old in out_dir.glob(f"{name}-[0-9]*.tar"):
            old.unlink(missing_ok=True)
        (out_dir / f"{name}.json").unlink(missing_ok=True)
    info = {
        "source": source or {},
        "val_fraction": val_fraction,
        "seed": seed,
        "written_by": "pipeline.prepare",
    }
    manifests = {}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".prepare-") as tmp:
        for name in reversed(names):  # the train manifest, written last, marks completion
            if len(parts[name]):
                manifests[name] = _write_split(
                    load,
                    parts[name],
                    out_dir,
                    Path(tmp),
                    name,
                    classes=classes,
                    max_samples=max_samples,
                    max_bytes=max_bytes,
                    info=info,
                )
    return dict(sorted(manifests.items(), key=lambda kv: names.index(kv[0])))


def _encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=FORMATS[fmt], **({"quality": 95} if fmt != "png" else {}))
    return out.getvalue()


def fit_within(image: Image.Image, max_size: int) -> Image.Image | None:
    """``image`` with its shorter side scaled down to ``max_size`` pixels, aspect kept
    (Lanczos; a JPEG first decoded at the largest DCT scale that keeps twice the target,
    as PIL's ``thumbnail`` does); None when it is no larger already (never upscaled)."""
    width, height = image.size
    if min(width, height) <= max_size:
        return None
    scale = max_size / min(width, height)
    size = (
        (max_size, max(1, round(height * scale)))
        if width <= height
        else (max(1, round(width * scale)), max_size)
    )
    image.draft(None, (2 * size[0], 2 * size[1]))  # a no-op for anything but JPEG
    if image.mode not in ("1", "L", "LA", "RGB", "RGBA", "CMYK", "I", "F"):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image.resize(size, Image.LANCZOS)


class Resizer:
    """``prepare --max-size N``: stores images with the shorter side at most N, as
    img2dataset and FFCV do at write time, and keeps the figures prepare reports: bytes in
    and out, and the full decode time of a sample of resized images against their sources."""

    def __init__(self, max_size: int):
        if max_size < 1:
            raise ConfigError(f"max_size must be a positive number of pixels, got {max_size}")
        self.max_size = max_size
        self.images = self.resized = self.bytes_in = self.bytes_out = 0
        self.decode_in = self.decode_out = 0.0  # seconds over the sample
        self.sampled = 0

    def image(self, image: Image.Image) -> Image.Image:
        """A decoded image (a torchvision dataset's), fitted; not counted in bytes."""
        self.images += 1
        fitted = fit_within(image, self.max_size)
        self.resized += fitted is not None
        return image if fitted is None else fitted

    def bytes(self, data: bytes, ext: str) -> bytes:
        """Encoded image bytes, fitted and re-encoded in their own format (JPEG and WebP at
        quality 95); bytes of an image that fits already are kept as they are."""
        self.images += 1
        self.bytes_in += len(data)
        with Image.open(io.BytesIO(data)) as image:
            fitted = fit_within(image, self.max_size)
            out = data if fitted is None else _encode(fitted, ext.replace("jpeg", "jpg"))
        self.bytes_out += len(out)
        if fitted is not None:
            self.resized += 1
            if self.sampled < DECODE_SAMPLE:
                self.sampled += 1
                self.decode_in += _decode_seconds(data)
                self.decode_out += _decode_seconds(out)
        return out

    def report(self) -> str:
        """One line: images resized, bytes saved and decode time saved (on the sample)."""
        line = f"--max-size {self.max_size}: {self.resized} of {self.images} images resized"
        if self.bytes_in:
            saved = 1 - self.bytes_out / self.bytes_in
            line += (
                f"; {self.bytes_in / 1e6:,.1f} MB of source images -> "
                f"{self.bytes_out / 1e6:,.1f} MB written ({saved:.0%} saved)"
            )
        if self.sampled:
            before, after = (
                1e3 * self.decode_in / self.sampled,
                1e3 * self.decode_out / self.sampled,
            )
            line += (
                f"; full decode of a sample of {self.sampled} resized images: {before:.1f} ms "
                f"-> {after:.1f} ms per image ({1 - after / before:.0%} saved)"
            )
        return line


def _decode_seconds(data: bytes) -> float:
    """Seconds ``torchvision.io.decode_image`` (what the loader uses) takes on ``data``."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    start = time.perf_counter()
    decode_image(raw)
    return time.perf_counter() - start


def _existing(
    out_dir: str | Path,
    overwrite: bool,
    source: dict,
    *,
    val_fraction: float,
    seed: int,
    names: tuple[str, str],
    **shard_sizes: int,
) -> Path | None:
    """The first split's manifest from an earlier run of the same parameters (source
    included), unless ``overwrite``. Shards of other parameters are a ConfigError: reusing
    them would train on data other than the one asked for."""
    path = Path(out_dir) / f"{names[0]}.json"
    if overwrite or not path.is_file():
        return None
    info = read_manifest(path).info
    params = {"val_fraction": val_fraction, "seed": seed, **source}
    differ = []
    for key, value in params.items():
        recorded = info[key] if key in info else info.get("source", {}).get(key)
        if recorded != value:
            differ.append(f"{key}={recorded!r}, not {value!r}")
    if differ:
        raise ConfigError(
            f"{path} was written with {'; '.join(differ)}; write to another folder, or "
            f"pass --force (overwrite=True) to rewrite it"
        )
    return path


# ----------------------------------------------------------------------------- sources


def prepare_folder(
    src: str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
    names: tuple[str, str] = ("train", "val"),
    max_size: int | None = None,
    **kw: Any,
) -> Path:
    """Image folder tree -> shards; returns the train manifest.

    ``src/<class>/**/<image>`` gives class names (sorted) and labels 0..K-1; a folder with
    images and no subfolders gives unlabeled samples. Image bytes are stored unchanged,
    unless ``max_size``: then an image whose shorter side is longer is stored resized to
    it (``Resizer``), and the bytes and decode time saved are logged.
    """
    src = Path(src)
    if not src.is_dir():
        raise ConfigError(f"image folder not found: {src}")
    resizer = Resizer(max_size) if max_size is not None else None
    source = {"kind": "folder", "path": str(src), "max_size": max_size}
    splitting = {"val_fraction": val_fraction, "seed": seed, "names": names, **kw}
    if (found := _existing(out_dir, overwrite, source, **splitting)) is not None:
        return found
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    roots = [(src / c, label) for label, c in enumerate(classes)] or [(src, -1)]
    items = [
        (p, label)
        for root, label in roots
        for p in sorted(root.rglob("*"))
        if p.suffix.lower() in FOLDER_EXTS and p.is_file()
    ]

    def load(i: int) -> tuple[bytes, str, int]:
        path, label = items[i]
        data, ext = path.read_bytes(), FOLDER_EXTS[path.suffix.lower()]
        return (data if resizer is None else resizer.bytes(data, ext)), ext, label

    written = write_dataset(load, len(items), out_dir, classes=classes, source=source, **splitting)
    if resizer is not None:
        log.info(resizer.report())
    return written[names[0]]


def prepare_digits(
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    size: int = 32,
    overwrite: bool = False,
    names: tuple[str, str] = ("train", "val"),
    **kw: Any,
) -> Path:
    """scikit-learn's 1,797 digits -> grayscale PNG shards; returns the train manifest
    (``val.json`` sits beside it). Idempotent: an existing ``train.json`` is reused.

    Images are upsampled once, bilinearly, from 8x8 to ``size`` (default 32, the model's
    default input) exactly as ``pipeline.data.digits.digits_tensor`` does, so crops work at
    32-pixel granularity; ``size=8`` stores the native images. PNG keeps them lossless.
    With several processes, let one write first (``accelerator.main_process_first()``).
    """
    source = {"kind": "digits", "size": size}
    splitting = {"val_fraction": val_fraction, "seed": seed, "names": names, **kw}
    if (found := _existing(out_dir, overwrite, source, **splitting)) is not None:
        return found

    images, labels = digits_tensor(size)
    pixels = images[:, 0].add(1).mul(127.5).round().clamp(0, 255).byte().numpy()

    def load(i: int) -> tuple[bytes, str, int]:
        return _encode(Image.fromarray(pixels[i]), "png"), "png", int(labels[i])

    classes = [str(d) for d in range(10)]
    return write_dataset(load, len(pixels), out_dir, classes=classes, source=source, **splitting)[
        names[0]
    ]


def prepare_torchvision(
    name: str,
    root: str | Path,
    out_dir: str | Path,
    *,
    split: str = "train",
    val_fraction: float = 0.1,
    seed: int = 0,
    image_format: str = "png",
    overwrite: bool = False,
    names: tuple[str, str] = ("train", "val"),
    max_size: int | None = None,
    **kw: Any,
) -> Path:
    """A torchvision dataset already on disk (``download=False``) -> shards.

    ``split`` is passed as ``train=(split == "train")`` or ``split=split``, whichever the
    dataset takes (neither for e.g. ImageFolder). Images are re-encoded as ``image_format``
    (png: lossless). Returns the first split's manifest; ``names=("test", "unused"),
    val_fraction=0`` writes a test set. ``max_size``: images whose shorter side is longer
    are resized to it before encoding (``Resizer``).
    """

    cls = getattr(tvd, name, None)
    if not (isinstance(cls, type) and issubclass(cls, tvd.VisionDataset)):
        raise ConfigError(f"torchvision.datasets has no dataset {name!r}")
    resizer = Resizer(max_size) if max_size is not None else None
    source = {"kind": "torchvision", "name": name, "split": split, "max_size": max_size}
    splitting = {"val_fraction": val_fraction, "seed": seed, "names": names, **kw}
    if (found := _existing(out_dir, overwrite, source, **splitting)) is not None:
        return found
    params = inspect.signature(cls).parameters
    args: dict[str, Any] = {"download": False} if "download" in params else {}
    if "train" in params:
        args["train"] = split == "train"
    elif "split" in params:
        args["split"] = split
    try:
        dataset = cls(str(root), **args)
    except (RuntimeError, OSError, ValueError, TypeError) as err:
        raise ConfigError(f"cannot open torchvision {name} at {root} ({args}): {err}") from None
    fmt = image_format.lower().lstrip(".").replace("jpeg", "jpg")
    if fmt not in ("png", "jpg", "webp"):
        raise ConfigError(f"image_format must be png, jpg or webp, got {image_format!r}")

    def load(i: int) -> tuple[bytes, str, int]:
        image, target = dataset[i]
        rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
        if resizer is not None:
            rgb = resizer.image(rgb)
        return _encode(rgb, fmt), fmt, int(target) if target is not None else -1

    classes = list(getattr(dataset, "classes", []))
    written = write_dataset(
        load, len(dataset), out_dir, classes=classes, source=source, **splitting
    )
    if resizer is not None:
        log.info(resizer.report())
    return written[names[0]]
