"""scikit-learn's bundled digits (1,797 8x8 images): the embedded default data set."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.pixels import normalize


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, 8, 8) in [0, 255] and integer labels (N,). Needs no network."""
    from sklearn.datasets import load_digits  # on use: 1.6 s that only digits runs need

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return images, d.target.astype(np.int64)


def digits_tensor(size: int = 32, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as model inputs (N, 3, size, size), bilinearly upsampled, and labels."""
    images, labels = load_digits_uint8()
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = normalize(torch.from_numpy(images).float().div(255)).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels)
