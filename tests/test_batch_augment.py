"""Batched on-device augmentation: per-image parameters, resumable draws, exact geometry
and colour maths (against torchvision's per-image functionals), and the loader side."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from pipeline.core.schema import DataConfig
from pipeline.data import batch_augment as ba
from pipeline.data.augment import FixedSize
from pipeline.data.loaders import eval_loader, train_loader
from pipeline.data.write import write_dataset


def image_bytes(value: int, size: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value % 256, np.uint8)).save(out, format="png")
    return out.getvalue()


def pattern(batch: int = 4, size: int = 16, chans: int = 3) -> torch.Tensor:
    """The same textured colour image ``batch`` times (so any difference is augmentation)."""
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, chans, size, size), generator=g, dtype=torch.uint8)
    return one.expand(batch, -1, -1, -1).contiguous()


def augmenter(**kw) -> ba.BatchAugment:
    args = {
        "img_size": 16,
        "seed": 0,
        "rank": 0,
        "crop_scale_min": 0.5,
        "flip": True,
        "color_jitter": 0.4,
    }
    return ba.BatchAugment(**{**args, **kw})


def identity_params(n: int, **changes) -> ba.ViewParams:
    one, zero = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    p = ba.ViewParams(
        crop_w=one,
        crop_h=one,
        centre_x=zero,
        centre_y=zero,
        flip=one,
        brightness=one,
        contrast=one,
        saturation=one,
        hue=zero,
        gray=zero,
    )
    return dataclasses.replace(p, **changes)


def test_images_of_one_batch_get_their_own_crop_and_colour():
    # Catches one parameter set shared by the batch (what v2 functionals would do).
    x = pattern(8)
    crops = augmenter(color_jitter=0.0)(x, step=0)[0]
    assert all(not torch.allclose(crops[0], crops[i]) for i in range(1, 8))
    flat = torch.full((8, 3, 16, 16), 120, dtype=torch.uint8)  # crops cannot change it
    flat[:, 0] = 200
    colours = augmenter(crop_scale_min=1.0)(flat, step=0)[0].mean(dim=(2, 3))
    assert len({tuple(c.round(decimals=3).tolist()) for c in colours}) >= 6  # ~20% skip jitter
    p = augmenter().params(8, step=0)[0]
    assert p.crop_w.unique().numel() == 8 and p.centre_x.unique().numel() == 8


def test_same_seed_rank_step_same_views_after_a_resume():
    # Catches draws from the global RNG or from a counter that a restart resets.
    x = pattern(6)
    first = augmenter(views=2)(x, step=41)
    torch.manual_seed(123)  # a resumed process has other global RNG state
    again = augmenter(views=2)(x, step=41)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    for other in (
        augmenter(views=2)(x, step=42),
        augmenter(views=2, rank=1)(x, step=41),
        augmenter(views=2)(x, step=41, micro=1),
    ):
        assert not torch.allclose(first[0], other[0])


@pytest.mark.parametrize("chans,source", [(3, 16), (1, 16), (3, 24)])
def test_shape_range_dtype_and_two_differing_views(chans, source):
    x = pattern(5, size=source, chans=chans)
    views = augmenter(views=2, grayscale_p=0.25)(x, step=3)
    assert len(views) == 2
    for v in views:
        assert v.shape == (5, chans, 16, 16) and v.dtype == torch.float32
        assert v.min() >= -1 and v.max() <= 1
    assert all(not torch.allclose(views[0][i], views[1][i]) for i in range(5))


def test_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        augmenter()(torch.zeros(2, 3, 16, 16), step=0)


def test_geometry_identity_flip_and_crop_box():
    # Catches a wrong sign or scale in the affine grid: the box must land where asked.
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ba.crop_flip(x, identity_params(2), 16), x, atol=1e-5)
    mirrored = ba.crop_flip(x, identity_params(2, flip=-torch.ones(2, dtype=torch.float64)), 16)
    assert torch.allclose(mirrored, x.flip(-1), atol=1e-5)
    halves = torch.zeros(1, 1, 16, 16)
    halves[..., 8:] = 1  # left half black, right half white
    half = torch.full((1,), 0.5, dtype=torch.float64)
    left = ba.crop_flip(halves, identity_params(1, crop_w=half, centre_x=-half), 16)
    right = ba.crop_flip(halves, identity_params(1, crop_w=half, centre_x=half), 16)
    # pixel centres: only the column next to the cut samples across it (bilinear)
    assert left[..., :-1].max() < 1e-6 and right[..., 1:].min() > 1 - 1e-6


def test_colour_maths_match_torchvision_per_image():
    # Each image gets its own factor; the batch result must equal torchvision applied
    # to that image alone with that factor (brightness, contrast, saturation, hue in turn).
    x = torch.rand(4, 3, 12, 12)
    f = torch.tensor([0.6, 1.0, 1.3, 0.9], dtype=torch.float64)
    hue = torch.tensor([-0.1, 0.0, 0.07, 0.25], dtype=torch.float64)
    cases = [
        ("brightness", f, TF.adjust_brightness),
        ("contrast", f, TF.adjust_contrast),
        ("saturation", f, TF.adjust_saturation),
        ("hue", hue, TF.adjust_hue),
    ]
    for name, values, reference in cases:
        p = identity_params(4, **{name: values})
        got = ba.color_jitter(x, p)
        want = torch.stack([reference(x[i], float(values[i])) for i in range(4)])
        assert torch.allclose(got, want, atol=2e-3), name
    assert torch.allclose(ba.color_jitter(x, identity_params(4)), x, atol=1e-5)
    gray = ba.grayscale(
        x, identity_params(4, gray=torch.tensor([1.0, 0, 0, 1], dtype=torch.float64))
    )
    assert torch.allclose(gray[0], TF.rgb_to_grayscale(x[0], num_output_channels=3), atol=1e-5)
    assert torch.equal(gray[1], x[1])


def test_jitter_and_grayscale_probabilities():
    p = augmenter(grayscale_p=0.25).params(4000, step=0)[0]
    jittered = (p.brightness != 1).float().mean()
    assert 0.77 < jittered < 0.83 and 0.22 < p.gray.mean() < 0.28
    assert (p.crop_w * p.crop_h).min() >= 0.5 - 1e-9 and p.crop_w.max() <= 1
    assert (p.centre_x.abs() <= 1 - p.crop_w + 1e-9).all()  # the box stays in the image
    assert (p.flip == -1).float().mean().sub(0.5).abs() < 0.03
    gray_src = augmenter(grayscale_p=0.25).params(100, step=0, colour=False)[0]
    assert gray_src.gray.sum() == 0 and (gray_src.hue == 0).all()


def test_loader_side_decodes_only_and_eval_is_unchanged(tmp_path):
    def load(i: int) -> tuple[bytes, str, int]:
        return image_bytes(7 * i, size=20), "png", i % 10

    manifests = write_dataset(
        load, 12, tmp_path, classes=[str(c) for c in range(10)], val_fraction=0.0, max_samples=6
    )
    spec = str(manifests["train"])
    cfg = DataConfig(train_shards=spec, num_workers=0, augment="amdim", shuffle_buffer=4)
    batch = next(
        iter(train_loader(cfg, batch_size=3, img_size=16, in_chans=3, seed=0, rank=0, world_size=1))
    )
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 3, 16, 16)
    assert "image2" not in batch  # the second view is made on the device
    assert ba.build_batch_augment(cfg, img_size=16, seed=0, rank=0).views == 2
    for off in (
        dataclasses.replace(cfg, augment_on="worker"),
        dataclasses.replace(cfg, augment="none"),
    ):
        assert ba.build_batch_augment(off, img_size=16, seed=0, rank=0) is None
        b = next(
            iter(
                train_loader(
                    off, batch_size=3, img_size=16, in_chans=3, seed=0, rank=0, world_size=1
                )
            )
        )
        assert b["image"].dtype == torch.float32
    ev = next(iter(eval_loader(spec, batch_size=3, img_size=16, in_chans=3)))
    fit, square = FixedSize(16, 3), torch.zeros(3, 16, 16, dtype=torch.uint8)
    assert fit(square) is square and fit(torch.zeros(3, 20, 24, dtype=torch.uint8)).shape == (
        3,
        16,
        16,
    )
    assert ev["image"].dtype == torch.float32 and -1 <= ev["image"].min() <= ev["image"].max() <= 1
