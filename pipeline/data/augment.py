"""Image transforms (torchvision.transforms.v2) from uint8 (C, H, W) to normalised float views.

Every view ends in ``[-1, 1]`` (mean 0.5, std 0.5 per channel), the same range as
``pipeline.data.digits.digits_tensor``, so shards and the in-memory digits look alike to a model.
Grayscale sources are expanded to RGB at decode time; ``in_chans=1`` converts back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.core.errors import ConfigError, choose
from pipeline.core.pixels import MEAN, STD
from pipeline.core.schema import DataConfig
from pipeline.data.decode import Reduced


@dataclass(frozen=True)
class Recipe:
    """What one ``data.augment`` choice means, to the worker path (``build_views``) and
    the batched one (``pipeline.data.batch_augment``) alike."""

    views: int  # independently augmented views per image
    random: bool  # False: resize and centre-crop only
    grayscale_p: float = 0.0  # chance of a grayscale view (colour images)


AUGMENTS = {
    "none": Recipe(views=1, random=False),
    "simple": Recipe(views=1, random=True),
    # AMDIM (Bachman et al. 2019): crop, jitter and grayscale drawn independently per view.
    "amdim": Recipe(views=2, random=True, grayscale_p=0.25),
}


def view_count(cfg: DataConfig) -> int:
    """Views per image: ``data.views``, or the recipe's own when it is 0."""
    recipe = choose("data.augment", cfg.augment, AUGMENTS)
    if cfg.views > 1 and not recipe.random:
        raise ConfigError(
            f"data.views={cfg.views} needs a random data.augment: with "
            f"{cfg.augment!r} every view of an image is the same picture"
        )
    return cfg.views or recipe.views


class Fit:
    """Resize the short side to ``img_size`` and centre-crop: the geometry of evaluation,
    and of the loader when augmentation runs batched. Nothing random.

    It takes a full decode (a tensor) or a ``Reduced`` JPEG (``pipeline.data.decode``),
    which it cuts at the same box in source coordinates with PIL's antialiased resize, so
    the two differ by resampling only. ``reduction`` tells the decoder how far a source
    may shrink before the fit without losing detail."""

    def __init__(self, img_size: int):
        self.size = img_size
        self.steps: list[v2.Transform] = [
            v2.Resize(img_size, antialias=True),
            v2.CenterCrop(img_size),
        ]
        self.tensor = v2.Compose(self.steps)

    def reduction(self, width: int, height: int) -> float:
        """Times the source may shrink and still give ``img_size`` pixels on the short side."""
        return min(width, height) / self.size

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The part of the source the output shows, (left, top, right, bottom) in source pixels."""
        # As Resize then CenterCrop compute it: the long side truncated, the offset rounded.
        size, short, long = self.size, min(width, height), max(width, height)
        new_w, new_h = (int(size * long / short), size)[:: 1 if width >= height else -1]
        left, top = round((new_w - size) / 2), round((new_h - size) / 2)
        sx, sy = width / new_w, height / new_h
        return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)

    def __call__(self, image: torch.Tensor | Reduced) -> torch.Tensor:
        if isinstance(image, Reduced):
            box = tuple(v / image.factor for v in self.box(*image.source))
            out = image.image.resize((self.size,) * 2, Image.BILINEAR, box=box, reducing_gap=None)
            return v2.functional.pil_to_tensor(out)
        return self.tensor(image)


class RandomFit(Fit):
    """RandomResizedCrop (area ``(crop_scale_min, 1)``, aspect 3/4..4/3) to ``img_size``.

    The box is drawn by torchvision's own ``make_params`` on the source size, so a
    ``Reduced`` JPEG gets the box the full decode would get from the same random state."""

    def __init__(self, img_size: int, crop_scale_min: float):
        super().__init__(img_size)
        self.crop = v2.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), antialias=True)
        self.steps, self.tensor = [self.crop], self.crop

    def reduction(self, width: int, height: int) -> float:
        # The smallest box has area scale[0] * w * h and aspect 3/4 (or 4/3): its short
        # side is sqrt(3/4 * area), less half a pixel of rounding.
        ratio = min(self.crop.ratio[0], 1 / self.crop.ratio[1])
        short = math.sqrt(ratio * self.crop.scale[0] * width * height) - 0.5
        return short / self.size

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        p = self.crop.make_params([torch.empty(0, height, width)])  # the size is all it reads
        return (p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"])


class FixedSize(Fit):
    """``Fit`` to a uint8 square in ``in_chans`` channels, nothing random: what workers do
    when the random augmentation runs batched (``pipeline.data.batch_augment``). An image
    that already fits is passed through (the v2 chain costs ~25 us at 32 px, as much as
    decoding it)."""

    def __init__(self, img_size: int, in_chans: int):
        super().__init__(img_size)
        self.shape = (in_chans, img_size, img_size)
        channels = _channels(in_chans)
        self.channels = v2.Compose(channels) if channels else None
        self.tensor = v2.Compose([*channels, *self.steps])

    def __call__(self, image: torch.Tensor | Reduced) -> torch.Tensor:
        if isinstance(image, Reduced):
            out = super().__call__(image)
            return self.channels(out) if self.channels is not None else out
        return image if tuple(image.shape) == self.shape else self.tensor(image)


class Views:
    """``image -> [view] * count``: each view ``transform(fit(image))``, drawn independently
    (picklable for workers). ``reduction`` is the fit's: how far the decoder may shrink a
    source for these views."""

    def __init__(self, transform: v2.Transform | None, count: int = 1, *, fit: Fit):
        self.transform, self.count, self.fit = transform, count, fit

    def reduction(self, width: int, height: int) -> float:
        return self.fit.reduction(width, height)

    def __call__(self, image: torch.Tensor | Reduced) -> list[torch.Tensor]:
        if self.transform is None:
            return [self.fit(image) for _ in range(self.count)]
        return [self.transform(self.fit(image)) for _ in range(self.count)]


def _channels(in_chans: int) -> list[v2.Transform]:
    if in_chans not in (1, 3):
        raise ConfigError(f"model.in_chans must be 1 or 3 for image shards, got {in_chans}")
    return [v2.Grayscale(num_output_channels=1)] if in_chans == 1 else []


def _finish(in_chans: int) -> list[v2.Transform]:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([MEAN] * in_chans, [STD] * in_chans),
    ]


def eval_transform(img_size: int, in_chans: int) -> v2.Compose:
    """Resize the short side, centre-crop, normalise: no randomness (one tensor chain,
    what the export reads its preprocessing from)."""
    return v2.Compose([*_channels(in_chans), *Fit(img_size).steps, *_finish(in_chans)])


def eval_views(img_size: int, in_chans: int) -> Views:
    """``eval_transform`` as views: the fit apart, so JPEGs may be decoded reduced."""
    return Views(v2.Compose([*_channels(in_chans), *_finish(in_chans)]), fit=Fit(img_size))


def train_transform(
    in_chans: int,
    *,
    flip: bool,
    color_jitter: float,
    grayscale_p: float = 0.0,
) -> v2.Compose:
    """What follows the random crop (``RandomFit``): optional flip, colour jitter (p=0.8)
    and random grayscale, then normalisation."""
    steps: list[v2.Transform] = [*_channels(in_chans)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    colour = in_chans == 3
    if color_jitter > 0:
        s = color_jitter
        jitter = v2.ColorJitter(
            brightness=s,
            contrast=s,
            saturation=s if colour else 0,
            hue=min(s / 4, 0.5) if colour else 0,
        )
        steps.append(v2.RandomApply([jitter], p=0.8))
    if grayscale_p > 0 and colour:
        steps.append(v2.RandomGrayscale(p=grayscale_p))
    return v2.Compose([*steps, *_finish(in_chans)])


def build_views(cfg: DataConfig, *, img_size: int, in_chans: int) -> Views:
    """``image -> [view] * count`` as ``cfg.augment`` (``AUGMENTS``) asks, per image."""
    recipe = choose("data.augment", cfg.augment, AUGMENTS)
    if not recipe.random:
        return eval_views(img_size, in_chans)
    transform = train_transform(
        in_chans,
        flip=cfg.flip,
        color_jitter=cfg.color_jitter,
        grayscale_p=recipe.grayscale_p,
    )
    return Views(transform, count=view_count(cfg), fit=RandomFit(img_size, cfg.crop_scale_min))
