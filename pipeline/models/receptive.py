"""Receptive field of a feature-map location, in input pixels.

Local DIM only means something when one location of the local map sees a part of the
image: ``receptive_field`` measures how much. It backpropagates from the centre
location of the map to the input through a *dense* copy of the backbone (weights made
positive, biases zeroed, normalisation statistics reset, max-pools turned into average
pools of the same window, strictly positive input), so no gradient cancels or dies in a
ReLU and the non-zero input gradient covers exactly the theoretical receptive field.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["gradient_extent", "receptive_field"]


def _densify(model: nn.Module) -> nn.Module:
    dense = copy.deepcopy(model).float().eval()
    for _name, module in list(dense.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MaxPool2d):  # argmax routes gradient to one pixel
                setattr(
                    module,
                    child_name,
                    nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode),
                )
    with torch.no_grad():
        for module in dense.modules():
            for pname, param in module.named_parameters(recurse=False):
                if pname == "bias":
                    param.zero_()
                else:
                    param.abs_().add_(1e-3)
            if (
                isinstance(module, nn.modules.batchnorm._NormBase)
                and module.running_mean is not None
            ):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
    return dense


def gradient_extent(feature_map_of, image: torch.Tensor) -> int:
    """Side (pixels) of the box where d(centre location of the map)/d(image) != 0.

    ``feature_map_of(image) -> (1, C, h, w)``; ``image`` is (1, C, H, W).
    """
    image = image.detach().clone().requires_grad_(True)
    fmap = feature_map_of(image)
    h, w = fmap.shape[-2:]
    fmap[0, :, h // 2, w // 2].sum().backward()
    touched = image.grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = touched.any(dim=1).nonzero(), touched.any(dim=0).nonzero()
    if rows.numel() == 0:
        return 0
    return int(max(rows.max() - rows.min(), cols.max() - cols.min())) + 1


def receptive_field(backbone: nn.Module, index: int, img_size: int, in_chans: int = 3) -> int:
    """Receptive field (pixels, one side) of stage ``index`` of a timm backbone.

    Measured on a canvas three times the image size where the model takes any size, so
    a field larger than the image shows as larger; models bound to their input size
    (ViTs) are measured at ``img_size``.
    """
    dense = _densify(backbone)

    def stage(x: torch.Tensor) -> torch.Tensor:
        return dense.forward_intermediates(
            x, indices=[index], stop_early=True, intermediates_only=True
        )[0]

    def canvas(size: int) -> torch.Tensor:
        return torch.rand(1, in_chans, size, size, generator=torch.Generator().manual_seed(0)) + 0.5

    try:
        return gradient_extent(stage, canvas(3 * img_size))
    except (RuntimeError, AssertionError, ValueError):  # fixed-size models refuse the canvas
        return gradient_extent(stage, canvas(img_size))
