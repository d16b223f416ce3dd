"""Step-speed options: ``train.channels_last`` and ``train.compile``.

Both change how the step runs, never what it computes. ``nn.Module.compile()`` compiles
in place, so parameter names, checkpoints and the exported encoder are the same as
without it (``torch.compile(module)`` would wrap it and prefix every key with
``_orig_mod.``). The encoder and the objective (critics + estimators) are compiled
separately: the cross-device gather inside the objective is a graph break, and the
encoder is where almost all of the time goes.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["prepare_input", "prepare_model"]


def prepare_model(model: nn.Module, cfg: TrainConfig, *, backend: str = "inductor") -> nn.Module:
    """Apply the options to a DIM model (in place); returns it for chaining. ``backend``
    is torch.compile's (tests pass "eager": the same tracing without the C++ build)."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        for part in (model.encoder, model.objective):
            part.compile(backend=backend)
    return model


def prepare_input(images: torch.Tensor | None, cfg: TrainConfig) -> torch.Tensor | None:
    """Images (or None: no second view) in the memory layout the model was given."""
    if images is None or not cfg.channels_last:
        return images
    return images.contiguous(memory_format=torch.channels_last)
