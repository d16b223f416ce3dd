"""Frozen features for evaluation: one pass over labelled batches, many encoders.

The views follow the DIM paper's evaluation:

- ``conv``: the last convolutional layer, global-average pooled: the backbone's
  pooled pre-logits (``EncoderOutput.pooled``). ``conv_source="local"`` uses the
  local map C that the local MI term trains, mean-pooled over positions, instead.
- ``fc``: the hidden layer between backbone and code (``EncoderOutput.fc``).
- ``y``: the code mean (``EncoderOutput.mu``); in eval mode z = mu.

Encoders run in eval mode (BatchNorm running statistics, no sampling) and their
previous train/eval state is restored afterwards, so the online probe can call this
in the middle of training. Batches are any iterable of ``{"image", "label"}`` dicts.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .encoder import EncoderOutput

__all__ = ["VIEWS", "CONV_SOURCES", "views_of", "extract_features", "unwrap_encoder"]

VIEWS = ("conv", "fc", "y")
CONV_SOURCES = ("pooled", "local")
PIXELS = "pixels"


def unwrap_encoder(model: nn.Module) -> nn.Module:
    """The DIMEncoder inside a DDP/DeepSpeed wrapper and/or the DIM model."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "encoder", model)


def views_of(out: EncoderOutput, conv_source: str = "pooled") -> dict[str, torch.Tensor]:
    """The three evaluation views of one encoder output, flattened to (N, D)."""
    conv = out.pooled if conv_source == "pooled" else out.local.mean(dim=(2, 3))
    return {"conv": conv.flatten(1), "fc": out.fc.flatten(1), "y": out.mu.flatten(1)}


@contextmanager
def _eval_mode(modules: Iterable[nn.Module]):
    modules = list(modules)
    states = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, state in zip(modules, states):
            m.train(state)


@torch.no_grad()
def extract_features(encoders: Mapping[str, nn.Module], batches: Iterable[dict], *,
                     device: torch.device | str = "cpu", pixels: bool = False,
                     limit: int | None = None, conv_source: str = "pooled",
                     ) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """Run every encoder over the batches once; return ``{model: {view: (N, D)}}``
    (CPU float tensors) and the labels (N,).

    ``pixels=True`` adds ``{"pixels": {"pixels": flattened images}}``. ``limit``
    stops after that many samples (the stream is deterministic, so it is the same
    samples every time).
    """
    if conv_source not in CONV_SOURCES:
        raise ValueError(f"conv_source must be one of {CONV_SOURCES}, got {conv_source!r}")
    encoders = {name: unwrap_encoder(m) for name, m in encoders.items()}
    parts: dict[str, dict[str, list[torch.Tensor]]] = {n: {} for n in encoders}
    if pixels:
        parts[PIXELS] = {}
    labels: list[torch.Tensor] = []
    seen = 0
    with _eval_mode(encoders.values()):
        for batch in batches:
            images, y = batch["image"], batch["label"]
            if limit is not None:
                images, y = images[:limit - seen], y[:limit - seen]
            if images.shape[0] == 0:
                break
            x = images.to(device, non_blocking=True).float()
            for name, enc in encoders.items():
                for view, feats in views_of(enc(x), conv_source).items():
                    parts[name].setdefault(view, []).append(feats.float().cpu())
            if pixels:
                parts[PIXELS].setdefault(PIXELS, []).append(images.float().flatten(1).cpu())
            labels.append(y.long().cpu())
            seen += images.shape[0]
            if limit is not None and seen >= limit:
                break
    if not labels:
        raise ValueError("no labelled samples to extract features from")
    feats = {m: {v: torch.cat(chunks) for v, chunks in views.items()} for m, views in parts.items()}
    return feats, torch.cat(labels)
