"""Batched augmentation on the training device: uint8 batches in, normalised views out.

Loader workers only decode and fit each image to a fixed square (``augment.FixedSize``);
the random part runs here on the whole batch at once, on whatever device the step runs:

- random resized crop + horizontal flip: one affine sampling grid per image, one
  ``grid_sample`` for the batch (torchvision.transforms.v2 functionals apply a single
  parameter set to a whole batch, so they cannot give per-image crops);
- colour jitter with p=0.8 (brightness, contrast, saturation, hue), per-image factors
  as batched tensor maths; an image that skips jitter gets the identity factors;
- random grayscale, then normalisation to [-1, 1] (``pipeline.core.pixels``), as ``augment.py``.

Every image and every view gets its own parameters, drawn on the CPU from a generator
seeded by ``(seed, rank, step, micro_batch)``, so a run resumed at step k draws what an
uninterrupted run draws at step k, on any device. Differences from the per-image PIL
path (``data.augment_on=worker``): crops are continuous (sub-pixel) boxes inside the
fitted square rather than integer boxes of the original image; a box that would leave
the image is clamped instead of re-drawn; and jitter runs in the fixed order brightness,
contrast, saturation, hue (torchvision shuffles the order; without the [0, 1] clamps
the first three commute exactly, hue is the one that does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.pixels import normalize
from pipeline.core.schema import DataConfig
from pipeline.data.augment import AUGMENTS, view_count

__all__ = [
    "BatchAugment",
    "ViewParams",
    "build_batch_augment",
    "color_jitter",
    "crop_flip",
    "draw_params",
    "grayscale",
    "on_batch",
    "rgb_to_gray",
]

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
JITTER_P = 0.8  # as the worker path's RandomApply([ColorJitter], p=0.8)
LOG_RATIOS = (math.log(3 / 4), math.log(4 / 3))  # RandomResizedCrop's default aspect range


def on_batch(cfg: DataConfig) -> bool:
    """Whether the random augmentation runs batched in the train loop (not in workers)."""
    return cfg.augment_on == "batch" and AUGMENTS[cfg.augment].random


def seed_of(seed: int, rank: int, step: int, micro: int = 0) -> int:
    """A well-mixed 63-bit seed from the tuple (consecutive steps give unrelated draws)."""
    state = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


@dataclass
class ViewParams:
    """One view's per-image parameters, each a (B,) float tensor on the CPU."""

    crop_w: torch.Tensor  # crop width and height as fractions of the source side
    crop_h: torch.Tensor
    centre_x: torch.Tensor  # crop centre in [-1, 1] (grid_sample coordinates)
    centre_y: torch.Tensor
    flip: torch.Tensor  # -1 mirrors, +1 keeps
    brightness: torch.Tensor  # jitter factors; 1, 1, 1, 0 where jitter is skipped
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor  # shift in turns, [-0.5, 0.5]
    gray: torch.Tensor  # 1 where the view becomes grayscale


def draw_params(
    batch: int,
    generator: torch.Generator,
    *,
    crop_scale_min: float,
    flip: bool,
    jitter: float,
    grayscale_p: float,
    colour: bool,
) -> ViewParams:
    """Independent parameters for ``batch`` images from one fixed-layout draw."""
    u = torch.rand(batch, 11, generator=generator, dtype=torch.float64)
    area = crop_scale_min + (1 - crop_scale_min) * u[:, 0]
    log_ratio = LOG_RATIOS[0] + (LOG_RATIOS[1] - LOG_RATIOS[0]) * u[:, 1]
    w = (area * log_ratio.exp()).sqrt().clamp(max=1)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1)
    cx = (1 - w) * (2 * u[:, 2] - 1)  # the box stays inside [-1, 1]
    cy = (1 - h) * (2 * u[:, 3] - 1)
    mirror = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(batch, dtype=u.dtype)
    apply = (u[:, 5] < JITTER_P) & (jitter > 0)

    def factor(col: torch.Tensor, spread: float, identity: float) -> torch.Tensor:
        drawn = identity + spread * (2 * col - 1)
        return torch.where(apply, drawn, torch.full_like(drawn, identity))

    s = jitter
    return ViewParams(
        crop_w=w,
        crop_h=h,
        centre_x=cx,
        centre_y=cy,
        flip=mirror,
        brightness=factor(u[:, 6], s, 1.0).clamp(min=0),
        contrast=factor(u[:, 7], s, 1.0).clamp(min=0),
        saturation=factor(u[:, 8], s if colour else 0.0, 1.0).clamp(min=0),
        hue=factor(u[:, 9], min(s / 4, 0.5) if colour else 0.0, 0.0),
        gray=((u[:, 10] < grayscale_p) & colour).to(u.dtype),
    )


def crop_flip(images: torch.Tensor, p: ViewParams, size: int) -> torch.Tensor:
    """Float (B, C, H, W) -> (B, C, size, size): per-image crop box and mirror, bilinear."""
    b = images.shape[0]
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = p.crop_w * p.flip
    theta[:, 0, 2] = p.centre_x
    theta[:, 1, 1] = p.crop_h
    theta[:, 1, 2] = p.centre_y
    theta = theta.to(images.device, images.dtype)
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma; one-channel input is returned as is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB images in [0, 1] by ``shift`` turns, per image."""
    r, g, b = x.unbind(1)
    value, _ = x.max(1)
    delta = value - x.min(1).values
    sat = delta / value.clamp(min=1e-8)
    safe = delta.clamp(min=1e-8)
    hue = torch.where(
        value == r,
        ((g - b) / safe) % 6,
        torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB without branches: channel n is V - V S clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6 H) mod 6 with n = 5, 3, 1 for R, G, B.
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + 6 * hue.unsqueeze(1)) % 6
    return value.unsqueeze(1) * (1 - sat.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Brightness, contrast, saturation, hue with per-image factors; x in [0, 1]."""

    def col(t: torch.Tensor) -> torch.Tensor:
        return t.to(x.device, x.dtype).view(-1, 1, 1, 1)

    x = (x * col(p.brightness)).clamp(0, 1)
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = _blend(x, mean, col(p.contrast))
    if x.shape[1] == 3:
        x = _blend(x, rgb_to_gray(x), col(p.saturation))
        if bool((p.hue != 0).any()):
            x = _hue_shift(x, p.hue.to(x.device, x.dtype))
    return x


def grayscale(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Replace the views marked in ``p.gray`` by their luma on every channel."""
    if x.shape[1] == 1 or not bool(p.gray.any()):
        return x
    mask = p.gray.to(x.device, torch.bool).view(-1, 1, 1, 1)
    return torch.where(mask, rgb_to_gray(x).expand_as(x), x)


class BatchAugment:
    """``(uint8 batch, step) -> [view] * views``: the train-side half of ``augment_on=batch``."""

    def __init__(
        self,
        *,
        img_size: int,
        seed: int,
        rank: int,
        crop_scale_min: float,
        flip: bool,
        color_jitter: float,
        grayscale_p: float = 0.0,
        views: int = 1,
    ):
        self.img_size, self.seed, self.rank, self.views = img_size, seed, rank, views
        self.kw = {
            "crop_scale_min": crop_scale_min,
            "flip": flip,
            "jitter": color_jitter,
            "grayscale_p": grayscale_p,
        }

    def params(
        self, batch: int, step: int, micro: int = 0, colour: bool = True
    ) -> list[ViewParams]:
        """The parameters ``__call__`` uses: a pure function of (seed, rank, step, micro)."""
        gen = torch.Generator().manual_seed(seed_of(self.seed, self.rank, step, micro))
        return [draw_params(batch, gen, colour=colour, **self.kw) for _ in range(self.views)]

    def __call__(self, images: torch.Tensor, step: int, micro: int = 0) -> list[torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"expected a uint8 (B, C, H, W) batch, got {images.dtype} {tuple(images.shape)}"
            )
        x = images.float().div_(255)
        out = []
        for p in self.params(len(images), step, micro, colour=images.shape[1] == 3):
            view = grayscale(color_jitter(crop_flip(x, p, self.img_size), p), p)
            out.append(normalize(view))
        return out


def build_batch_augment(
    cfg: DataConfig, *, img_size: int, seed: int, rank: int
) -> BatchAugment | None:
    """The batched augmentation ``cfg`` asks for, or None (worker-side or no augmentation)."""
    if not on_batch(cfg):
        return None
    recipe = AUGMENTS[cfg.augment]
    return BatchAugment(
        img_size=img_size,
        seed=seed,
        rank=rank,
        crop_scale_min=cfg.crop_scale_min,
        flip=cfg.flip,
        color_jitter=cfg.color_jitter,
        grayscale_p=recipe.grayscale_p,
        views=view_count(cfg),
    )
