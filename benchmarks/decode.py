"""Images/s per core for each way into the loader's 224 px square, at three source sizes.

Paths, each decoding one JPEG and fitting it (short side to ``--img-size``, centre crop:
``augment.FixedSize``, what workers do with ``data.augment_on=batch``):

- ``full``: ``torchvision.io.decode_image`` at full size, then the v2 resize (the loader
  with ``data.jpeg_draft=false``);
- ``draft``: ``decode.read_image`` with the fit's reduction: PIL's draft mode decodes at
  1/2, 1/4 or 1/8 scale where the square keeps full detail (the loader's default);
- ``pre-resized``: the image as ``prepare --max-size`` stores it (``write.Resizer``, short
  side ``--max-size``), decoded by the loader's default path;
- ``gpu``: ``decode_jpeg(list, device="cuda")`` on batches of 64 and the fit on the GPU
  (``decode.decode_on_device``), images/s for the device, not per core; printed as
  skipped where no CUDA exists.

Sources are synthetic and photo-like: CIFAR-10 training images (``--tar``) upscaled
bicubically to each size, saved at quality 90, once smooth (grain 0) and once with
Gaussian grain (sigma 8 on 0-255, ``--grain``) so the JPEG carries fine detail as a
camera's does. Their mean size is printed: it matters, since libjpeg's entropy decoding
runs over every byte whatever the scale, so draft mode gains most on smooth images.
One thread (``torch.set_num_threads(1)``; run with ``OMP_NUM_THREADS=1``), one process,
each path timed for ``--seconds`` after a warm-up; the load average is printed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode.py [--seconds 2.5] [--img-size 224]
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.core.cli import comma_separated, exit_on_mistake
from pipeline.core.errors import ConfigError
from pipeline.data.augment import FixedSize
from pipeline.data.decode import decode_on_device, draft_factor, jpeg_size, read_image
from pipeline.data.write import DECODE_SAMPLE, Resizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TAR = ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar"
SIZES = ((500, 375), (1600, 1200), (4000, 3000))
GPU_BATCH = 64


def cifar_images(tar: Path, count: int) -> list[Image.Image]:
    """The first ``count`` JPEGs of the CIFAR-10 image-folder tar, as RGB images."""
    images = []
    with tarfile.open(tar) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".jpg"):
                data = archive.extractfile(member).read()
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                if len(images) == count:
                    break
    return images


def photo_jpeg(image: Image.Image, size: tuple[int, int], grain: float, seed: int) -> bytes:
    """``image`` upscaled to ``size`` with grain, as a quality-90 JPEG."""
    big = np.asarray(image.resize(size, Image.BICUBIC), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0, grain, big.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8)).save(
        out, format="JPEG", quality=90
    )
    return out.getvalue()


def rate(work, items: list, seconds: float) -> float:
    """Items/s of ``work(item)`` over ``items`` in a loop, after one warm-up pass."""
    for item in items:
        work(item)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for item in items:
            work(item)
        done += len(items)
    return done / (time.perf_counter() - start)


def gpu_rate(sources: list[bytes], fit: FixedSize, seconds: float) -> str:
    if not torch.cuda.is_available():
        return "skipped (no CUDA)"
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in sources]
    batch = [raw[i % len(raw)] for i in range(GPU_BATCH)]

    def work(_):
        decode_on_device(batch, "cuda", in_chans=3, fit=fit)
        torch.cuda.synchronize()

    return f"{GPU_BATCH * rate(work, [0], seconds):,.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tar", type=Path, default=DEFAULT_TAR, help="CIFAR-10 image-folder tar")
    parser.add_argument("--seconds", type=float, default=2.5, help="timed seconds per figure")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--max-size", type=int, default=256, help="pre-resized short side")
    parser.add_argument("--images", type=int, default=4, help="distinct images per size")
    parser.add_argument(
        "--grain", type=comma_separated(float), default="0,8", help="grain sigmas on 0-255"
    )
    args = parser.parse_args(argv)
    if not args.tar.is_file():
        raise ConfigError(f"{args.tar} not found: --tar takes the CIFAR-10 image-folder tar")
    torch.set_num_threads(1)
    fit = FixedSize(args.img_size, 3)
    cifar = cifar_images(args.tar, args.images)
    print(
        f"cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, img_size {args.img_size}, "
        f"--max-size {args.max_size}, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        "source     grain  KB/img  draft  full img/s  draft img/s  pre-resized img/s  "
        "resize at write img/s  gpu img/s"
    )
    for grain, size in ((g, s) for g in args.grain for s in SIZES):
        sources = [photo_jpeg(im, size, grain, i) for i, im in enumerate(cifar)]
        resizer = Resizer(args.max_size)
        resized = [resizer.bytes(d, "jpg") for d in sources]
        full = rate(lambda d: fit(read_image(d, "jpg", in_chans=3)), sources, args.seconds)
        draft = rate(
            lambda d: fit(read_image(d, "jpg", in_chans=3, reduction=fit.reduction)),
            sources,
            args.seconds,
        )
        pre = rate(
            lambda d: fit(read_image(d, "jpg", in_chans=3, reduction=fit.reduction)),
            resized,
            args.seconds,
        )
        timed = Resizer(args.max_size)
        timed.sampled = DECODE_SAMPLE  # its own decode timing is not part of the cost
        write = rate(partial(timed.bytes, ext="jpg"), sources, args.seconds)
        factor = draft_factor(fit.reduction(*jpeg_size(sources[0])))
        kb = sum(map(len, sources)) / len(sources) / 1e3
        print(
            f"{f'{size[0]}x{size[1]}':<10} {grain:5.0f}  {kb:6,.0f}  1/{factor:<3} {full:10,.1f}  "
            f"{draft:11,.1f}  {pre:17,.1f}  {write:21,.1f}  {gpu_rate(sources, fit, args.seconds)}",
            flush=True,
        )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    exit_on_mistake("decode.py", main)
