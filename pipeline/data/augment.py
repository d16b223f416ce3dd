"""Image transforms (torchvision.transforms.v2) from uint8 (C, H, W) to normalised float views.

Every view ends in ``[-1, 1]`` (mean 0.5, std 0.5 per channel), the same range as
``pipeline.data.digits.digits_tensor``, so shards and the in-memory digits look alike to a model.
Grayscale sources are expanded to RGB at decode time; ``in_chans=1`` converts back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from pipeline.core.errors import ConfigError, choose
from pipeline.core.pixels import MEAN, STD
from pipeline.core.schema import DataConfig


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


class Views:
    """``image -> [view] * count``, each view drawn independently (picklable for workers)."""

    def __init__(self, transform: v2.Transform, count: int = 1):
        self.transform, self.count = transform, count

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [self.transform(image) for _ in range(self.count)]


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
    """Resize the short side, centre-crop, normalise: no randomness."""
    return v2.Compose(
        [
            *_channels(in_chans),
            v2.Resize(img_size, antialias=True),
            v2.CenterCrop(img_size),
            *_finish(in_chans),
        ]
    )


class FixedSize:
    """Resize the short side and centre-crop to a uint8 square, nothing random: what
    workers do when the random augmentation runs batched (``pipeline.data.batch_augment``).
    An image that already fits is passed through (the v2 chain costs ~25 us at 32 px,
    as much as decoding it)."""

    def __init__(self, img_size: int, in_chans: int):
        self.shape = (in_chans, img_size, img_size)
        self.transform = v2.Compose(
            [*_channels(in_chans), v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size)]
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image if tuple(image.shape) == self.shape else self.transform(image)


def train_transform(
    img_size: int,
    in_chans: int,
    *,
    crop_scale_min: float,
    flip: bool,
    color_jitter: float,
    grayscale_p: float = 0.0,
) -> v2.Compose:
    """Random resized crop, optional flip, colour jitter (p=0.8) and random grayscale."""
    steps: list[v2.Transform] = [
        *_channels(in_chans),
        v2.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), antialias=True),
    ]
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
        return Views(eval_transform(img_size, in_chans))
    transform = train_transform(
        img_size,
        in_chans,
        crop_scale_min=cfg.crop_scale_min,
        flip=cfg.flip,
        color_jitter=cfg.color_jitter,
        grayscale_p=recipe.grayscale_p,
    )
    return Views(transform, count=recipe.views)
