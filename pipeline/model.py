"""DIM = encoder + critics in one module, so DDP / DeepSpeed wrap a single forward."""

from __future__ import annotations

import torch
from torch import nn

from .config import Config
from .encoder import DIMEncoder
from .objective import DIMObjective

__all__ = ["DIM", "build_model"]


class DIM(nn.Module):
    def __init__(self, encoder: DIMEncoder, objective: DIMObjective):
        super().__init__()
        self.encoder = encoder
        self.objective = objective

    def forward(
        self,
        images: torch.Tensor,
        images2: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        """images (and optionally a second view of them) -> (loss, terms).

        terms are detached scalars for logging. Both views go through the encoder in one
        batch, so BatchNorm sees them together and the backbone runs once.
        """
        if images2 is None:
            return self.objective(self.encoder(images), generator=generator)
        both = self.encoder(torch.cat([images, images2]))
        first, second = (
            type(both)(*view) for view in zip(*(t.chunk(2) for t in both), strict=True)
        )
        return self.objective(first, second, generator=generator)


def build_model(cfg: Config) -> DIM:
    m = cfg.model
    encoder = DIMEncoder(
        m.backbone,
        code_dim=m.code_dim,
        fc_dim=m.fc_dim,
        local_layer=m.local_layer,
        in_chans=m.in_chans,
        img_size=m.img_size,
        pretrained=m.pretrained,
        backbone_kwargs=m.backbone_kwargs,
    )
    objective = DIMObjective(cfg.loss, encoder.local_channels, m.code_dim)
    return DIM(encoder, objective)
