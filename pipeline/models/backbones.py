"""Small-image backbones registered with timm (on ``import pipeline``).

timm's ImageNet stems shrink a 32 px image 4x before the first stage, so one location of
resnet18's layer1 already sees 43 px: "local" features that see the whole image turn
local MI into telling images apart. These models keep local features local, and being
timm models they go through ``timm.create_model``, ``forward_intermediates`` and the
export like any other backbone:

- ``dim_conv32``: the DIM paper's CIFAR-10 encoder (authors' ``basic32x32``): three
  4x4 stride-2 convs (64, 128, 256 channels) with BatchNorm and ReLU. Stage 1 is the
  paper's 8x8x128 local map (10 px receptive field); the pre-logits are the last
  4x4x256 map, flattened (the paper's fc layer is the DIM head's ``fc``).
- ``dim_conv64``: its 64 px sibling, one more stage (512 channels); stage 2 is an
  8x8x256 local map (22 px).
- ``resnet{18,34,50}_cifar``: timm ResNets with the CIFAR stem (3x3 stride-1 first
  conv, no max-pool), four times the resolution at every stage.

``model.backbone`` has no table of its own: timm's model registry is it, these models
join it with ``register_model``, ``check_backbone`` validates a name against it and
``timm.create_model`` dispatches on it.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.layers import SelectAdaptivePool2d, to_2tuple
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    parse_model_name,
    register_model,
)
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from pipeline.core.errors import ConfigError, unknown
from pipeline.core.pixels import MEAN, STD

__all__ = ["CifarResNet", "DIMConvNet", "check_backbone"]


def check_backbone(name: str) -> None:
    """``model.backbone`` names a timm model, checked without building it: timm's own, one
    below, one a user registers, or ``local-dir:FOLDER`` (a model folder such as an
    export). ``hf-hub:`` names are refused: timm would fetch them at run time, and a run
    never downloads. ``preflight`` and ``create_backbone`` both call this, so a name
    that passes the check is one that builds."""
    source, arch = parse_model_name(name)
    if source == "hf-hub":
        raise ConfigError(
            f"model.backbone={name!r}: hf-hub: names are fetched at run time, and a run "
            f"never downloads; download the folder first and give local-dir:FOLDER, or "
            f"name the architecture (e.g. resnet18)"
        )
    if source == "local-dir":
        if not (Path(arch) / "config.json").is_file():
            raise ConfigError(
                f"model.backbone={name!r}: no model folder there ({arch}/config.json missing)"
            )
    elif not timm.is_model(arch):
        raise unknown("model.backbone", name, timm.list_models())


def _cfg(size: int, pool: int, **kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (3, size, size),
        "pool_size": (pool, pool),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (MEAN,) * 3,  # what the data side applies (pipeline.core.pixels)
        "std": (STD,) * 3,
        "first_conv": "stages.0.conv",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "dim_conv32": _cfg(32, 4),
        "dim_conv64": _cfg(64, 4),
        "resnet18_cifar": _cfg(32, 4, first_conv="conv1", classifier="fc"),
        "resnet34_cifar": _cfg(32, 4, first_conv="conv1", classifier="fc"),
        "resnet50_cifar": _cfg(32, 4, first_conv="conv1", classifier="fc"),
    }
)


class _ConvBlock(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 4, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)


class DIMConvNet(nn.Module):
    """Stacked 4x4 stride-2 conv-BN-ReLU stages (the DIM paper's DCGAN-style encoder).

    ``global_pool="flatten"`` (default) keeps the last map's layout: the pre-logits are
    the flattened (C, H, W) map, as the paper's fc layer sees it; any timm pool type
    ("avg", "max", ...) pools it instead.
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (64, 128, 256),
        in_chans: int = 3,
        num_classes: int = 0,
        img_size: int | tuple[int, int] = 32,
        global_pool: str = "flatten",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.grad_checkpointing = False
        blocks, prev = [], in_chans
        for ch in channels:
            blocks.append(_ConvBlock(prev, ch))
            prev = ch
        self.stages = nn.Sequential(*blocks)
        self.feature_info = [
            {"num_chs": ch, "reduction": 2 ** (i + 1), "module": f"stages.{i}"}
            for i, ch in enumerate(channels)
        ]
        self.final_size = tuple(side // 2 ** len(channels) for side in to_2tuple(img_size))
        self.global_pool_type = ""
        self.reset_classifier(num_classes, global_pool)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool_type = global_pool
            if global_pool == "flatten":
                self.global_pool = nn.Flatten(1)
            else:
                self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        chs = self.feature_info[-1]["num_chs"]
        self.num_features = self.head_hidden_size = (
            chs * self.final_size[0] * self.final_size[1]
            if self.global_pool_type == "flatten"
            else chs
        )
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices=None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's feature-map API: the outputs of the stages in ``indices``."""

        if output_fmt != "NCHW":
            raise ValueError("DIMConvNet gives NCHW feature maps only")
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CifarResNet(ResNet):
    """timm's ResNet with the CIFAR stem: 3x3 stride-1 first conv, no max-pool."""

    def __init__(self, *args, in_chans: int = 3, **kwargs):
        super().__init__(*args, in_chans=in_chans, **kwargs)
        self.conv1 = nn.Conv2d(
            in_chans, self.conv1.out_channels, 3, stride=1, padding=1, bias=False
        )
        self.maxpool = nn.Identity()
        for info in self.feature_info:  # the stem no longer reduces by 4
            info["reduction"] //= 2 if info["module"] == "act1" else 4


def _conv_net(variant: str, pretrained: bool, channels: tuple[int, ...], **kwargs) -> DIMConvNet:
    features = {"flatten_sequential": True, "out_indices": tuple(range(len(channels)))}
    return build_model_with_cfg(
        DIMConvNet, variant, pretrained, feature_cfg=features, channels=channels, **kwargs
    )


def _cifar_resnet(variant: str, pretrained: bool, block, layers, **kwargs) -> CifarResNet:
    kwargs.pop("img_size", None)  # any input size works; accepted like DIMConvNet's
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, block=block, layers=layers, **kwargs
    )


@register_model
def dim_conv32(pretrained: bool = False, **kwargs) -> DIMConvNet:
    """The DIM paper's 32x32 encoder: conv 64-128-256, local map = stage 1 (8x8x128)."""
    return _conv_net("dim_conv32", pretrained, kwargs.pop("channels", (64, 128, 256)), **kwargs)


@register_model
def dim_conv64(pretrained: bool = False, **kwargs) -> DIMConvNet:
    """64x64 sibling: conv 64-128-256-512, local map = stage 2 (8x8x256)."""
    kwargs.setdefault("img_size", 64)
    return _conv_net(
        "dim_conv64", pretrained, kwargs.pop("channels", (64, 128, 256, 512)), **kwargs
    )


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _cifar_resnet("resnet18_cifar", pretrained, BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def resnet34_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _cifar_resnet("resnet34_cifar", pretrained, BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return _cifar_resnet("resnet50_cifar", pretrained, Bottleneck, (3, 4, 6, 3), **kwargs)
