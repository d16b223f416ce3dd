"""Checks of a whole run's input that need no model and write nothing.

The config loader checks keys, types and ranges; these check what the values point at:
the output folder, the shard specs and the backbone name. Each failure is one
``ConfigError`` naming the key, the value and what is allowed, raised before the run
creates its folder. Cheap checks come first.
"""

from __future__ import annotations

from pipeline.core.errors import ConfigError
from pipeline.core.schema import Config
from pipeline.data.shards import (
    resolve_spec,  # webdataset: imported once the folder is known fine
)
from pipeline.models.backbones import check_backbone
from pipeline.train.run_folder import check_output_dir

__all__ = ["check_backbone", "check_shards", "preflight"]


def check_shards(cfg: Config) -> None:
    """Every local shard of ``data.train_shards`` / ``data.val_shards`` exists."""

    for key in ("train_shards", "val_shards"):
        spec = getattr(cfg.data, key)
        if spec:
            try:
                resolve_spec(spec)
            except ConfigError as err:
                raise ConfigError(f"data.{key}: {err}") from None


def preflight(cfg: Config) -> None:
    """Everything about ``cfg`` that can be known before training, cheapest first."""
    check_output_dir(cfg.train.output_dir)
    check_shards(cfg)
    check_backbone(cfg.model.backbone)
