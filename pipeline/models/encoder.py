"""timm backbone -> local feature map C and a Gaussian global code (mu, logvar, z).

The backbone is a plain ``timm.create_model(name, num_classes=0)``, so its weights are
timm's own state dict and the export loads back with ``timm.create_model``. The local
map comes from ``forward_intermediates`` at a configurable stage (CNN stages and ViT
blocks alike: ViT patch tokens arrive as an (N, C, H, W) map); the code comes from the
backbone's pooled features through the DIM head fc -> (mu, logvar).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import timm
import torch
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.core.schema import ModelConfig
from pipeline.models.backbones import check_backbone
from pipeline.models.receptive import receptive_field

__all__ = ["DIMEncoder", "EncoderOutput", "build_encoder", "create_backbone"]


class EncoderOutput(NamedTuple):
    local: torch.Tensor  # (N, c, h, w) local feature map C(x)
    final: torch.Tensor  # the backbone's last feature map ((N, C, H, W) for CNNs)
    pooled: torch.Tensor  # (N, F) backbone pre-logits ("conv" view in evaluation)
    fc: torch.Tensor  # (N, fc_dim) the layer before the code ("fc" view)
    mu: torch.Tensor  # (N, d) code mean ("y" view)
    logvar: torch.Tensor  # (N, d) code log-variance
    z: torch.Tensor  # (N, d) reparameterised sample (mu itself in eval mode)


def create_backbone(
    name: str, *, in_chans: int = 3, img_size: int | None = None, pretrained: bool = False, **kwargs
) -> nn.Module:
    """``timm.create_model`` with no classifier, for a name ``check_backbone`` accepts."""
    check_backbone(name)

    def make(**kw):
        return timm.create_model(
            name,
            pretrained=pretrained,
            num_classes=0,
            in_chans=in_chans,
            **kw,
        )

    if img_size is not None and "img_size" not in kwargs:
        try:  # transformers build their position embeddings for the input size
            model = make(img_size=img_size, **kwargs)
        except TypeError:  # CNNs take any input size and have no such argument
            model = make(**kwargs)
    else:
        model = make(**kwargs)
    if not hasattr(model, "forward_intermediates"):
        raise ConfigError(
            f"backbone {name!r} has no forward_intermediates in timm "
            f"{timm.__version__}; pick a model that supports feature maps"
        )
    return model


class DIMEncoder(nn.Module):
    """Encoder E(x) = (C(x), mu(x), logvar(x)) with z = mu + exp(logvar / 2) * eps."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        backbone, local_layer = cfg.backbone, cfg.local_layer
        self.backbone_name = backbone
        self.backbone = create_backbone(
            backbone,
            in_chans=cfg.in_chans,
            img_size=cfg.img_size,
            pretrained=cfg.pretrained,
            **cfg.backbone_kwargs,
        )
        stages = self.backbone.feature_info
        if not -len(stages) <= local_layer < len(stages):
            raise ConfigError(
                f"model.local_layer={local_layer} is out of range: {backbone!r} "
                f"has {len(stages)} feature stages "
                f"({', '.join(s['module'] for s in stages)})"
            )
        self.local_index = local_layer % len(stages)
        self.local_channels = stages[self.local_index]["num_chs"]
        self.fc = nn.Sequential(
            nn.Linear(self.backbone.num_features, cfg.fc_dim),
            nn.BatchNorm1d(cfg.fc_dim),
            nn.ReLU(inplace=True),
        )
        self.mu = nn.Linear(cfg.fc_dim, cfg.code_dim)
        self.logvar = nn.Linear(cfg.fc_dim, cfg.code_dim)
        self.code_dim, self.in_chans = cfg.code_dim, cfg.in_chans

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        final, (local,) = self.backbone.forward_intermediates(x, indices=[self.local_index])
        pooled = self.backbone.forward_head(final, pre_logits=True)
        fc = self.fc(pooled)
        mu, logvar = self.mu(fc), self.logvar(fc)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return EncoderOutput(local, final, pooled, fc, mu, logvar, z)

    def receptive_field(self, img_size: int) -> int:
        """Pixels (one side) that one location of the local map sees."""

        return receptive_field(self.backbone, self.local_index, img_size, self.in_chans)


def build_encoder(model: Mapping[str, Any], *, pretrained: bool = False) -> DIMEncoder:
    """The ``DIMEncoder`` a model config describes: the ``model`` section of a run's
    config, or the same fields as an export saves them.

    ``pretrained`` (timm's weights for the backbone) is an argument, not read from
    ``model``: rebuilding an export must not download what its own weights replace.
    """
    return DIMEncoder(ModelConfig(**{**model, "pretrained": pretrained}))
