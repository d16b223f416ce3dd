"""Checks of a whole run's input that write nothing, made before the run creates its folder.

The config loader checks keys, types and ranges; these check what the values point at:
the output folder, the shard specs, the backbone and its local layer (the model is built
on the meta device: its shapes without its memory), and a W&B mode that needs a key.
Each failure is one ``ConfigError`` naming the key, the value and what is allowed.
Cheap checks come first.
"""

from __future__ import annotations

import dataclasses

import torch

from pipeline.core.errors import ConfigError
from pipeline.core.schema import Config
from pipeline.data.shards import resolve_spec
from pipeline.models.backbones import check_backbone
from pipeline.models.encoder import DIMEncoder
from pipeline.share.tracking import has_api_key, wandb_mode
from pipeline.train.run_folder import check_output_dir

__all__ = ["check_model", "check_shards", "check_wandb", "preflight"]


def check_shards(cfg: Config) -> None:
    """Every local shard of ``data.train_shards`` / ``data.val_shards`` exists."""
    for key in ("train_shards", "val_shards"):
        spec = getattr(cfg.data, key)
        if spec:
            try:
                resolve_spec(spec)
            except ConfigError as err:
                raise ConfigError(f"data.{key}: {err}") from None


def check_model(cfg: Config) -> None:
    """The encoder ``model.*`` describes can be built: the backbone name, its keyword
    arguments and ``model.local_layer`` (built on the meta device, in milliseconds)."""
    check_backbone(cfg.model.backbone)
    try:
        with torch.device("meta"):  # never timm's weights: a check downloads nothing
            DIMEncoder(dataclasses.replace(cfg.model, pretrained=False))
    except TypeError as err:  # timm's constructor refused a keyword
        raise ConfigError(f"model.backbone_kwargs {cfg.model.backbone_kwargs}: {err}") from None


def check_wandb(cfg: Config) -> None:
    """``wandb.mode=online`` needs an API key (``WANDB_API_KEY`` or ``wandb login``)."""
    if wandb_mode(cfg.wandb.mode) == "online" and not has_api_key():
        raise ConfigError(
            "wandb.mode=online needs an API key: set WANDB_API_KEY or run `wandb login`, "
            "or use wandb.mode=offline (sync later with `wandb sync`)"
        )


def preflight(cfg: Config) -> None:
    """Everything about ``cfg`` that can be known before training, cheapest first."""
    check_output_dir(cfg.train.output_dir)
    check_wandb(cfg)
    check_shards(cfg)
    check_model(cfg)
