"""Checks of a whole run's input that need no model and write nothing.

The config loader checks keys, types and ranges; these check what the values point at:
the output folder, the shard specs and the backbone name. Each failure is one
``ConfigError`` naming the key, the value and what is allowed, raised before the run
creates its folder. Cheap checks come first: importing timm takes seconds.
"""

from __future__ import annotations

from .config import Config
from .errors import ConfigError, unknown
from .run_folder import check_output_dir

__all__ = ["check_backbone", "check_shards", "preflight"]


def check_backbone(name: str) -> None:
    """``model.backbone`` names a timm model (timm's own or one this package registers),
    checked by name without building it; ``hf-hub:`` / ``local-dir:`` names pass through."""
    import timm
    from timm.models import parse_model_name

    from . import model  # noqa: F401  (its import registers this package's backbones)

    source, arch = parse_model_name(name)
    if source is None and not timm.is_model(arch):
        raise unknown("model.backbone", name, timm.list_models())


def check_shards(cfg: Config) -> None:
    """Every local shard of ``data.train_shards`` / ``data.val_shards`` exists."""
    from .shards import resolve_spec  # webdataset: imported once the folder is known fine

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
