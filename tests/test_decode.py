"""Reduced-scale JPEG decoding (PIL draft) and the device-decoding path, on the CPU.

The draft path must cut the same box as the full decode, in source coordinates, and keep
every crop at full detail; the device path runs here with ``device="cpu"`` (torchvision's
CPU ``decode_jpeg`` on a list), so everything but nvJPEG itself is exercised.
"""

from __future__ import annotations

import io
import logging
from itertools import islice

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from pipeline.core.schema import DataConfig
from pipeline.data import loaders
from pipeline.data.augment import FixedSize, RandomFit
from pipeline.data.decode import (
    Reduced,
    decode_on_device,
    draft_factor,
    jpeg_size,
    read_image,
)
from pipeline.data.loaders import train_loader

# Measured on these photo-like images (a smooth field plus grain, quality 90): the draft
# path's crops differ from the full decode's by 0.3-0.7 on 0-255 on average, 6 at most
# (resampling: libjpeg's scaled IDCT + PIL's filter against a full IDCT + torchvision's).
# A box one decoded pixel off gives 3.6-15 on average (16-65 at most); another
# random box, 60-72.
MEAN_TOL, MAX_TOL = 1.5, 12


def photo(width: int, height: int, seed: int = 0, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """Photo-like bytes: a smooth random colour field (bicubic from 24x18) plus grain."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (18, 24, 3), dtype=np.uint8))
    base = np.asarray(field.resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, base.shape, dtype=np.int16)
    image = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.float() - b.float()).abs()
    return d.mean().item(), d.max().item()


def test_jpeg_size_reads_the_frame_header():
    assert jpeg_size(photo(123, 45)) == (123, 45)
    assert jpeg_size(photo(40, 30, fmt="PNG")) is None
    assert jpeg_size(b"\xff\xd8\xff\xe0\x00") is None  # cut inside the header
    assert [draft_factor(r) for r in (0.5, 1.9, 2, 3.99, 4, 7.9, 8, 100)] == [
        1,
        1,
        2,
        2,
        4,
        4,
        8,
        8,
    ]


@pytest.mark.parametrize(
    "size, img_size, factor",
    [  # factor: the largest of 2, 4, 8 keeping the smallest crop (area 0.5, aspect 3/4)
        # at >= img_size pixels a side: sqrt(0.75 * 0.5 * w * h) / img_size
        ((1600, 1200), 224, 2),  # 848 / 224 = 3.8
        ((1200, 1600), 96, 8),  # 848 / 96 = 8.8
        ((4000, 3000), 224, 8),  # 2121 / 224 = 9.5
    ],
)
def test_draft_random_crops_match_the_full_decode(size, img_size, factor):
    """Bugs caught: a box drawn on the reduced image's size (another box for the same
    random state), a box not scaled back by the factor, a factor larger than the crop
    allows (blur), and the crop bound computed without the aspect ratio."""
    data = photo(*size)
    fit = RandomFit(img_size, crop_scale_min=0.5)
    full = read_image(data, "jpg", in_chans=3)
    reduced = read_image(data, "jpg", in_chans=3, reduction=fit.reduction)
    assert isinstance(reduced, Reduced) and reduced.factor == factor
    assert tuple(full.shape) == (3, size[1], size[0])
    worst = (0.0, 0.0)
    for seed in range(6):
        torch.manual_seed(seed)
        a = fit(full)
        torch.manual_seed(seed)
        b = fit(reduced)
        assert a.shape == b.shape == (3, img_size, img_size)
        mean, top = diff(a, b)
        worst = (max(worst[0], mean), max(worst[1], top))
    assert worst[0] < MEAN_TOL and worst[1] < MAX_TOL, worst


def test_every_random_box_keeps_full_detail_at_the_chosen_factor():
    """The factor follows from the smallest box the crop can draw: every box, divided
    by it, is still at least img_size pixels a side."""
    fit = RandomFit(64, crop_scale_min=0.3)
    for width, height in ((1000, 700), (700, 1000), (2000, 530)):
        factor = draft_factor(fit.reduction(width, height))
        assert factor > 1
        torch.manual_seed(0)
        for _ in range(300):
            left, top, right, bottom = fit.box(width, height)
            assert min(right - left, bottom - top) / factor >= fit.size, (width, height, factor)


@pytest.mark.parametrize("size, img_size", [((1600, 1200), 224), ((1000, 1000), 96)])
@pytest.mark.parametrize("in_chans", [3, 1])
def test_draft_fixed_size_matches_the_full_decode(size, img_size, in_chans):
    """The batched path's worker geometry (short side, centre crop) and evaluation's:
    the same square, in colour and in gray."""
    data = photo(*size, seed=1)
    fit = FixedSize(img_size, in_chans)
    reduced = read_image(data, "jpg", in_chans=in_chans, reduction=fit.reduction)
    assert isinstance(reduced, Reduced) and reduced.factor == draft_factor(min(size) / img_size)
    a, b = fit(read_image(data, "jpg", in_chans=in_chans)), fit(reduced)
    assert a.shape == b.shape == (in_chans, img_size, img_size)
    mean, top = diff(a, b)
    assert mean < MEAN_TOL and top < MAX_TOL, (mean, top)


def test_small_jpegs_png_and_webp_take_the_full_decode():
    fit = FixedSize(32, 3)
    small = photo(32, 32)
    out = read_image(small, "jpg", in_chans=3, reduction=fit.reduction)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, decode_image(torch.frombuffer(bytearray(small), dtype=torch.uint8)))
    for fmt, ext in (("PNG", "png"), ("WEBP", "webp")):
        data = photo(800, 600, fmt=fmt)
        out = read_image(data, ext, in_chans=3, reduction=fit.reduction)
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        assert torch.equal(out, decode_image(raw, mode=ImageReadMode.RGB)), fmt
    assert isinstance(read_image(photo(800, 600), "jpg", in_chans=3), torch.Tensor)  # no draft


def as_raw(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def test_decode_on_device_cpu_batch_mixes_raw_and_decoded_and_counts_bad_images():
    """The GPU path's code on the CPU: raw JPEGs of several sizes decoded as a list and
    fitted, beside a PNG the worker decoded already; a broken JPEG fails the list, the
    rest is decoded one by one and the broken one becomes gray and is counted."""
    fit = FixedSize(48, 3)
    jpegs = [photo(300, 200, seed=2), photo(90, 160, seed=3)]
    png = fit(decode_image(as_raw(photo(64, 64, seed=4, fmt="PNG"))))
    items = [as_raw(jpegs[0]), png, as_raw(jpegs[1])]
    batch, bad = decode_on_device(items, "cpu", in_chans=3, fit=fit)
    assert bad == 0 and batch.shape == (3, 3, 48, 48) and batch.dtype == torch.uint8
    for i, data in ((0, jpegs[0]), (2, jpegs[1])):
        assert torch.equal(batch[i], fit(decode_image(as_raw(data), mode=ImageReadMode.RGB)))
    assert torch.equal(batch[1], png)
    broken = as_raw(jpegs[0][:200] + b"\x00" * 50)
    batch, bad = decode_on_device([broken, as_raw(jpegs[1])], "cpu", in_chans=3, fit=fit)
    assert bad == 1 and bool((batch[0] == 128).all())
    assert torch.equal(batch[1], fit(decode_image(as_raw(jpegs[1]), mode=ImageReadMode.RGB)))
    gray, _ = decode_on_device([as_raw(jpegs[1])], "cpu", in_chans=1, fit=FixedSize(48, 1))
    assert gray.shape == (1, 1, 48, 48)


def jpeg_shard(tmp_path, n: int = 24) -> str:
    path = tmp_path / "photos-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            width, height = (120, 90) if i % 2 else (70, 100)
            ext, fmt = ("png", "PNG") if i % 5 == 0 else ("jpg", "JPEG")
            data = photo(width, height, seed=i, fmt=fmt)
            sink.write({"__key__": f"{i:04d}", ext: data, "cls": str(i % 3)})
    return str(path)


def test_without_cuda_decode_on_device_falls_back_to_the_cpu_and_says_so(tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fallback is not taken")
    shards = jpeg_shard(tmp_path)
    cfg = DataConfig(
        train_shards=shards, num_workers=0, epoch_samples=24, shuffle_buffer=0, decode_on="device"
    )
    with caplog.at_level(logging.INFO, logger="pipeline.data.loaders"):
        loader = train_loader(
            cfg, batch_size=8, img_size=32, in_chans=3, seed=0, rank=0, world_size=1
        )
    said = [r for r in caplog.records if "decode_on" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, said  # shown by default
    assert "no CUDA" in said[0].getMessage() and "CPU" in said[0].getMessage()
    assert loader.finish is None  # the worker path: no device step
    batch = next(iter(loader))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 32, 32)
    loader.close()


def test_decode_on_device_without_batched_augmentation_says_it_uses_the_cpu(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.data.loaders"):
        assert loaders.decode_device(DataConfig(decode_on="device", augment="none")) is None
        assert loaders.decode_device(DataConfig()) is None
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "augment_on=batch" in said[0], said


def test_the_shipped_path_gives_the_batches_the_worker_path_gives(tmp_path, monkeypatch):
    """The device path end to end with ``cpu`` as its device: workers ship raw JPEG
    bytes (PNGs decoded), the loader's process decodes and fits them; the batches equal
    the CPU path's (at 48 px no image here is large enough for the draft path)."""
    shards = jpeg_shard(tmp_path)

    def batches(decode_on: str) -> list[dict]:
        cfg = DataConfig(
            train_shards=shards,
            num_workers=1,
            epoch_samples=24,
            shuffle_buffer=8,
            decode_on=decode_on,
        )
        loader = train_loader(
            cfg, batch_size=6, img_size=48, in_chans=3, seed=0, rank=0, world_size=1
        )
        got = list(islice(iter(loader), 4))
        loader.close()
        return got

    cpu = batches("cpu")
    monkeypatch.setattr(loaders, "decode_device", lambda cfg: torch.device("cpu"))
    shipped = batches("device")
    assert len(cpu) == len(shipped) == 4
    for a, b in zip(cpu, shipped, strict=True):
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (6, 3, 48, 48)
        assert torch.equal(a["label"], b["label"])
        assert torch.equal(a["image"], b["image"])
