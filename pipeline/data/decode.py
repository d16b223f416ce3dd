"""Image bytes -> uint8 tensors, on the CPU at full or reduced scale, or in batches on a GPU.

Full-size photos cost most of their decode time in pixels the crop then throws away. A
JPEG stores 8x8 DCT blocks, so libjpeg can decode it directly at 1/2, 1/4 or 1/8 scale
(PIL's ``draft``) for a fraction of the work. ``read_image`` does that for a JPEG when the
geometry that follows (``augment.Fit``) says how far the source may shrink and still give
every crop at least ``img_size`` pixels a side; it returns a ``Reduced`` image that the
fit cuts at the same place, in source coordinates, as it would cut the full decode.
Every other image (PNG, WebP, a small JPEG such as CIFAR's 32 px) takes the full decode
(``torchvision.io.decode_image``) unchanged.

``decode_on_device`` is the other way out of the CPU bottleneck: the loader ships the
raw JPEG bytes, and the training process decodes the batch on its device with
``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA), fits each image to
the square there and hands the batch to the batched augmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

__all__ = [
    "DRAFT_FACTORS",
    "JPEG_EXTS",
    "Reduced",
    "decode_on_device",
    "draft_factor",
    "jpeg_size",
    "read_image",
    "read_mode",
]

log = logging.getLogger(__name__)

JPEG_EXTS = ("jpg", "jpeg")
DRAFT_FACTORS = (8, 4, 2)  # the scales libjpeg decodes at directly (1/8, 1/4, 1/2)
# Start-of-frame markers (they carry the size); C4, C8 and CC are other segments.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header without decoding; None when the bytes
    are not a JPEG with a readable header. A few marker hops: microseconds, so small
    JPEGs pay almost nothing for the check."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 9 < end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF:
            height = data[pos + 5] << 8 | data[pos + 6]
            width = data[pos + 7] << 8 | data[pos + 8]
            return (width, height) if width and height else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return None


def draft_factor(reduction: float) -> int:
    """The largest scale libjpeg decodes at (8, 4, 2) not above ``reduction``; 1 if none."""
    return next((k for k in DRAFT_FACTORS if k <= reduction), 1)


@dataclass
class Reduced:
    """A JPEG decoded at ``1/factor`` of its source size (PIL image, not yet a tensor).

    Source pixel ``x`` sits at ``x / factor`` in ``image`` (libjpeg's scaled IDCT; the last
    row and column may be partial, as ``image.size`` is the source size rounded up)."""

    image: Image.Image
    factor: int
    source: tuple[int, int]  # (width, height) of the full image


def read_mode(in_chans: int) -> ImageReadMode:
    return ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB


def _draft(data: bytes, factor: int, size: tuple[int, int], gray: bool) -> Reduced:
    image = Image.open(BytesIO(data))
    mode = "L" if gray else "RGB"
    if image.size != size:  # PIL reads the header differently from jpeg_size: decode in full
        raise _NoDraft
    drafted = image.draft(mode, (size[0] // factor, size[1] // factor))
    if drafted is None or drafted[1][2] * factor != size[0]:  # (mode, (0, 0, w / s, h / s))
        raise _NoDraft
    return Reduced(image.convert(mode) if image.mode != mode else image, factor, size)


class _NoDraft(Exception):
    pass


def read_image(
    data: bytes,
    ext: str,
    *,
    in_chans: int,
    reduction: Callable[[int, int], float] | None = None,
) -> torch.Tensor | Reduced:
    """One image's bytes -> a uint8 (C, H, W) tensor, or a ``Reduced`` JPEG.

    ``reduction(width, height)`` is how many times the source may shrink before the fit
    (``augment.Fit.reduction``); None decodes everything in full. A JPEG is decoded at
    1/2, 1/4 or 1/8 when that fits under it, anything else in full. WebP decodes as RGB
    (torchvision cannot give it gray). The caller scales 16-bit PNGs to 8 bits.
    """
    if reduction is not None and ext in JPEG_EXTS and (size := jpeg_size(data)) is not None:
        factor = draft_factor(reduction(*size))
        if factor > 1:
            try:
                return _draft(data, factor, size, gray=in_chans == 1)
            except _NoDraft:
                pass
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mode = ImageReadMode.RGB if ext == "webp" else read_mode(in_chans)
    return decode_image(raw, mode=mode)


def decode_on_device(
    items: list[torch.Tensor],
    device: torch.device | str,
    *,
    in_chans: int,
    fit: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, int]:
    """A batch as the loader ships it with ``data.decode_on=device`` -> (uint8 (B, C, S, S)
    on ``device``, images that would not decode).

    ``items``: raw JPEG bytes (1-D uint8, CPU) or images the workers decoded already (3-D,
    e.g. PNGs). The JPEGs are decoded together with ``decode_jpeg(list, device=device)``
    (nvJPEG on CUDA; on the CPU, libjpeg one by one, which is what the tests run) and
    each is fitted with ``fit`` on the device. nvJPEG fails a whole list for one bad
    image, so a failed list is decoded image by image, then on the CPU; an image that
    fails everywhere is replaced by mid-gray and counted.
    """
    mode = read_mode(in_chans)
    raw = [i for i, item in enumerate(items) if item.ndim == 1]
    decoded: list[torch.Tensor | None]
    try:
        decoded = list(decode_jpeg([items[i] for i in raw], mode=mode, device=device))
    except RuntimeError:
        decoded = [_one(items[i], mode, device) for i in raw]
    out: list[torch.Tensor | None] = [
        None if item.ndim == 1 else item.to(device, non_blocking=True) for item in items
    ]
    for i, image in zip(raw, decoded, strict=True):
        out[i] = None if image is None else fit(image)
    good = [t for t in out if t is not None]
    if not good:
        raise RuntimeError(f"none of {len(items)} images decoded on {device}")
    gray = torch.full_like(good[0], 128)
    return torch.stack([gray if t is None else t for t in out]), len(out) - len(good)


def _one(data: torch.Tensor, mode: ImageReadMode, device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=mode, device=device)
    except RuntimeError:
        pass
    try:
        return decode_image(data, mode=mode).to(device)
    except RuntimeError:
        return None
