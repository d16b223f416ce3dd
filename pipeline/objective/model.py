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

    def forward(self, *views: torch.Tensor, generator: torch.Generator | None = None):
        """One or more views of the same images -> (loss, terms).

        terms are detached scalars for logging. All views go through the encoder in one
        batch, so BatchNorm sees them together and the backbone runs once.
        """
        if len(views) == 1:
            return self.objective(self.encoder(views[0]), generator=generator)
        joint = self.encoder(torch.cat(views))
        parts = zip(*(t.chunk(len(views)) for t in joint), strict=True)
        return self.objective(*(type(joint)(*view) for view in parts), generator=generator)


def build_model(cfg: Config) -> DIM:
    encoder = build_encoder(dataclasses.asdict(cfg.model), pretrained=cfg.model.pretrained)
    objective = DIMObjective(cfg.loss, encoder.local_channels, cfg.model.code_dim)
    return DIM(encoder, objective)
