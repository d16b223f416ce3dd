"""Frozen features for evaluation: one pass over labelled batches, many encoders.

The views follow the DIM paper's evaluation:

- ``conv``: the last convolutional map, average-pooled to a small grid and flattened
  (``conv_source="grid"``, the default): the largest g x g grid, g <= 4, that keeps
  C * g * g <= 8192 features. The DIM paper's encoder keeps its whole 4x4x256 map
  (the paper's conv view); resnet18 at 32 px keeps 1x1x512, resnet50 at 224 px 2x2x2048.
  ``"pooled"`` takes the backbone's own pooled pre-logits, ``"local"`` the local map C
  that the local MI term trains, mean-pooled. Maps that are not (N, C, H, W) (ViT
  tokens) fall back to the pooled pre-logits.
- ``fc``: the hidden layer between backbone and code (``EncoderOutput.fc``).
- ``y``: the code mean (``EncoderOutput.mu``); in eval mode z = mu.

``logvar_of`` names encoders whose code log-variance is kept too, under ``LOGVAR``:
not a view to probe, the other half of the code that ``pipeline.eval.prior`` measures.

Encoders run in eval mode (BatchNorm running statistics, no sampling) and their
previous train/eval state is restored afterwards, so the online probe can call this
in the middle of training. Batches are any iterable of ``{"image", "label"}`` dicts.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.encoder import EncoderOutput

__all__ = [
    "CONV_SOURCES",
    "LOGVAR",
    "VIEWS",
    "conv_grid",
    "eval_mode",
    "extract_features",
    "recalibrate_batchnorm",
    "unwrap_encoder",
    "views_of",
]

VIEWS = ("conv", "fc", "y")
CONV_SOURCES = ("grid", "pooled", "local")
PIXELS = "pixels"
LOGVAR = "logvar"
GRID_MAX, GRID_MAX_FEATURES = 4, 8192


def unwrap_encoder(model: nn.Module) -> nn.Module:
    """The DIMEncoder inside a DDP/DeepSpeed wrapper and/or the DIM model."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "encoder", model)


def conv_grid(fmap: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C * g * g): average-pooled to the largest grid g <= 4 with
    C * g * g <= 8192, so probes see where features are without drowning in dimensions."""
    c, h, w = fmap.shape[1:]
    g = min(GRID_MAX, h, w)
    while g > 1 and c * g * g > GRID_MAX_FEATURES:
        g -= 1
    return F.adaptive_avg_pool2d(fmap, g).flatten(1)


def views_of(out: EncoderOutput, conv_source: str = "grid") -> dict[str, torch.Tensor]:
    """The three evaluation views of one encoder output, flattened to (N, D)."""
    if conv_source == "grid" and out.final.ndim == 4:
        conv = conv_grid(out.final)
    elif conv_source == "local":
        conv = out.local.mean(dim=(2, 3))
    else:
        conv = out.pooled
    return {"conv": conv.flatten(1), "fc": out.fc.flatten(1), "y": out.mu.flatten(1)}


def _first(batches: Iterable[dict], limit: int | None) -> Iterator[dict]:
    """The batches, the last one cut so that at most ``limit`` samples come out."""
    seen = 0
    for batch in batches:
        if limit is not None:
            batch = {
                k: v[: limit - seen] if torch.is_tensor(v) and v.ndim else v
                for k, v in batch.items()
            }
        n = batch["image"].shape[0]
        if n == 0:
            return
        yield batch
        seen += n
        if limit is not None and seen >= limit:
            return


@torch.no_grad()
def recalibrate_batchnorm(
    encoder: nn.Module,
    batches: Iterable[dict],
    *,
    device: torch.device | str = "cpu",
    limit: int | None = None,
) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (exact averages,
    torch's ``update_bn``).

    A randomly initialised network evaluated with BatchNorm's initial statistics (mean 0,
    variance 1) feeds wildly unnormalised activations forward; a fair random-init
    baseline takes its statistics from the data it is probed on, as a trained network
    does. Returns the number of images seen; the encoder is left in eval mode.
    """
    seen = 0

    def images() -> Iterator[torch.Tensor]:
        nonlocal seen
        for batch in _first(batches, limit):
            if batch["image"].shape[0] < 2:  # BatchNorm1d cannot normalise one sample
                return
            seen += batch["image"].shape[0]
            yield batch["image"].float()

    torch.optim.swa_utils.update_bn(images(), encoder, device=device)
    encoder.eval()
    return seen


@contextmanager
def eval_mode(*modules: nn.Module):
    """The modules in eval mode inside the block; each gets back its own train/eval
    state on leaving, so a probe or an evaluation can run in the middle of training."""
    states = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, state in zip(modules, states, strict=True):
            m.train(state)


@torch.no_grad()
def extract_features(
    encoders: Mapping[str, nn.Module],
    batches: Iterable[dict],
    *,
    device: torch.device | str = "cpu",
    pixels: bool = False,
    limit: int | None = None,
    conv_source: str = "grid",
    logvar_of: Collection[str] = (),
) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """Run every encoder over the batches once; return ``{model: {view: (N, D)}}``
    (CPU float tensors) and the labels (N,).

    ``pixels=True`` adds ``{"pixels": {"pixels": flattened images}}``, ``logvar_of``
    ``{model: {"logvar": (N, d)}}`` for the models it names. ``limit``
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
    with eval_mode(*encoders.values()):
        for batch in _first(batches, limit):
            images, y = batch["image"], batch["label"]
            x = images.to(device, non_blocking=True).float()
            for name, enc in encoders.items():
                out = enc(x)
                for view, feats in views_of(out, conv_source).items():
                    parts[name].setdefault(view, []).append(feats.float().cpu())
                if name in logvar_of:
                    parts[name].setdefault(LOGVAR, []).append(out.logvar.float().flatten(1).cpu())
            if pixels:
                parts[PIXELS].setdefault(PIXELS, []).append(images.float().flatten(1).cpu())
            labels.append(y.long().cpu())
    if not labels:
        raise ValueError("no labelled samples to extract features from")
    feats = {m: {v: torch.cat(chunks) for v, chunks in views.items()} for m, views in parts.items()}
    return feats, torch.cat(labels)
