"""DIM = encoder + critics in one module, so DDP / DeepSpeed wrap a single forward."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pipeline.core.schema import Config
from pipeline.models.encoder import DIMEncoder, build_encoder
from pipeline.objective.loss import DIMObjective

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
    encoder = build_encoder(dataclasses.asdict(cfg.model), pretrained=cfg.model.pretrained)
    objective = DIMObjective(cfg.loss, encoder.local_channels, cfg.model.code_dim)
    return DIM(encoder, objective)
