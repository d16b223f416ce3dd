"""Export a trained encoder as a timm / Hugging Face model folder, and load it back.

The folder is what ``timm.save_for_hf`` writes, so the field's loaders read it as is:

    config.json           timm's config (architecture, num_features, model_args,
                          pretrained_cfg with the input size and normalisation used in
                          training) plus a ``dim`` block: what rebuilds the DIM head
    model.safetensors     the backbone's timm state dict
    dim_head.safetensors  the DIM head (fc, mu, logvar)
    README.md             the model card (``pipeline.share.card``)

``timm.create_model("local-dir:FOLDER", pretrained=True)`` gives the backbone (after
``import pipeline`` when the backbone is one this project registers); ``load_encoder``
gives the whole ``DIMEncoder`` (also importable as ``pipeline.export.load_encoder``, the
path model cards print).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from torch import nn
from torchvision.transforms import v2

from pipeline.core.errors import ConfigError, state_dict_mismatch
from pipeline.core.files import CONFIG_FILE, clean_partial, new_partial, replace_folder
from pipeline.data.augment import eval_transform
from pipeline.models.encoder import DIMEncoder, build_encoder

__all__ = [
    "EXPORT_BACKBONE",
    "EXPORT_CARD",
    "EXPORT_CONFIG",
    "EXPORT_DIR",
    "EXPORT_FILES",
    "EXPORT_HEAD",
    "data_config",
    "export_encoder",
    "find_export",
    "is_export",
    "load_encoder",
    "read_export_meta",
    "remove_partial_export",
]

EXPORT_DIR = "export"  # the model folder inside a run's output_dir
EXPORT_CONFIG = "config.json"  # timm's config.json + the "dim" block
EXPORT_BACKBONE = "model.safetensors"  # timm state dict of the backbone alone
EXPORT_HEAD = "dim_head.safetensors"  # fc, mu, logvar of the DIM head
EXPORT_CARD = "README.md"  # the model card
EXPORT_FILES = (EXPORT_CONFIG, EXPORT_BACKBONE, EXPORT_HEAD, EXPORT_CARD)
CHECKPOINT_WEIGHTS = "model.safetensors"  # accelerate's save_state: the whole DIM model
EXPORT_FORMAT = "dim-pretrain/export/2"

# pretrained_cfg fields that describe the weights timm would download for this name,
# not the weights in this folder
_SOURCE_FIELDS = (
    "tag",
    "license",
    "origin_url",
    "paper_ids",
    "paper_name",
    "notes",
    "description",
    "hf_hub_filename",
    "hf_hub_id",
    "url",
)


def data_config(img_size: int, in_chans: int) -> dict:
    """timm's preprocessing fields, read off the evaluation transform the encoder saw.

    Reading them from ``pipeline.data.augment.eval_transform`` keeps one home for the
    normalisation: a change there changes the export too.
    """

    steps = eval_transform(img_size, in_chans).transforms
    norm = next(t for t in steps if isinstance(t, v2.Normalize))
    resize = next(t for t in steps if isinstance(t, v2.Resize))
    interpolation = getattr(resize.interpolation, "value", resize.interpolation)  # enum or str
    return {
        "input_size": (in_chans, img_size, img_size),
        "mean": tuple(norm.mean),
        "std": tuple(norm.std),
        "interpolation": str(interpolation),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def _standard_layout(module: nn.Module) -> nn.Module:
    """``module``, or a copy of it in the standard memory layout: safetensors refuses the
    channels_last weights that a run with ``train.channels_last`` trains."""
    if all(t.is_contiguous() for t in module.state_dict().values()):
        return module
    return copy.deepcopy(module).to(memory_format=torch.contiguous_format)


def _write_folder(encoder: DIMEncoder, folder: Path, meta: dict, card: str | None) -> None:
    save_for_hf(
        _standard_layout(encoder.backbone),
        str(folder),
        safe_serialization=True,
        model_config={"dim": {"format": EXPORT_FORMAT, **meta}},
        data_config=data_config(meta["img_size"], meta["in_chans"]),
    )
    config_file = folder / EXPORT_CONFIG
    config = json.loads(config_file.read_text())
    pcfg = config["pretrained_cfg"]
    for key in _SOURCE_FIELDS:
        pcfg.pop(key, None)
    pcfg["tag"] = "dim"
    size = config.get("model_args", {}).get("img_size")
    if isinstance(size, list) and len(set(size)) == 1:
        # timm records the size as (h, w); a square one goes back as the int the config
        # holds, which every model accepts (not all take a pair)
        config["model_args"]["img_size"] = size[0]
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    head = {
        k: v.detach().contiguous().cpu()
        for k, v in encoder.state_dict().items()
        if not k.startswith("backbone.")
    }
    save_file(head, str(folder / EXPORT_HEAD))
    if card is not None:
        (folder / EXPORT_CARD).write_text(card)


def export_encoder(
    encoder: DIMEncoder, folder: str | Path, meta: dict, card: str | None = None
) -> Path:
    """Write the model folder ``folder`` (replacing one there); returns the folder.

    ``meta`` is the model config (backbone, code_dim, fc_dim, local_layer, img_size,
    in_chans, backbone_kwargs); ``card`` the README.md text. The folder is built beside
    its final place and renamed in, so a reader never sees half an export.
    """
    tmp = new_partial(folder)
    try:
        _write_folder(encoder, tmp, meta, card)
        return replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only there when writing failed


def remove_partial_export(folder: str | Path) -> None:
    """Undo what a killed ``export_encoder`` left beside ``folder``."""
    clean_partial(Path(folder).parent)


def is_export(folder: Path) -> bool:
    try:
        return "dim" in json.loads((folder / EXPORT_CONFIG).read_text())
    except (json.JSONDecodeError, OSError):
        return False


def find_export(path: str | Path) -> Path:
    """The model folder for a model folder, a file in one, a run's output folder, or one
    of its training checkpoints (``RUN/checkpoints/step_N``: exported on first use).

    A run folder keeps its final export in ``export/``; failing that (only
    per-checkpoint exports) the newest model folder below it wins.
    """
    path = Path(path)
    if path.is_file():
        path = path.parent
    for candidate in (path, path / EXPORT_DIR):
        if is_export(candidate):
            return candidate
    if is_training_checkpoint(path):
        return export_checkpoint(path)
    found = []
    if path.is_dir():
        found = [
            p.parent
            for p in path.rglob(EXPORT_CONFIG)  # not a half-written .tmp-* one
            if not any(part.startswith(".") for part in p.relative_to(path).parts)
            and is_export(p.parent)
        ]
    if not found:
        steps = sorted(p for p in path.glob("checkpoints/step_*") if is_training_checkpoint(p))
        hint = (
            f"the run has checkpoints but no final export (stopped early?): pass one, "
            f"e.g. its latest {steps[-1]}"
            if steps
            else "pass a run's output folder or its export"
        )
        raise ConfigError(
            f"no exported encoder at {path}: expected a model folder "
            f"({EXPORT_CONFIG} + {EXPORT_BACKBONE}) there, in {EXPORT_DIR}/ "
            f"or below ({hint})"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def is_training_checkpoint(path: Path) -> bool:
    """A folder ``RUN/checkpoints/step_N`` as the trainer saves it (accelerate's state
    with the whole DIM model in one safetensors file), with the run's config two up."""
    return (path / CHECKPOINT_WEIGHTS).is_file() and (path.parent.parent / CONFIG_FILE).is_file()


def export_checkpoint(checkpoint: Path) -> Path:
    """The model folder of a training checkpoint, written once into ``checkpoint/export``
    (deleted with the checkpoint when it rotates out), so any step can be probed."""
    folder = checkpoint / EXPORT_DIR
    if is_export(folder):
        return folder
    config = yaml.safe_load((checkpoint.parent.parent / CONFIG_FILE).read_text()) or {}
    meta = config.get("model")
    if not isinstance(meta, dict):
        raise ConfigError(f"{checkpoint.parent.parent / CONFIG_FILE} has no model section")
    state = load_file(str(checkpoint / CHECKPOINT_WEIGHTS))
    prefix = "encoder."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:  # e.g. a DeepSpeed checkpoint, whose weights live elsewhere
        raise ConfigError(
            f"{checkpoint / CHECKPOINT_WEIGHTS} holds no DIM encoder weights "
            f"(keys {sorted(state)[:3]}...); export the run's final model instead"
        )
    encoder = build_encoder(meta)
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(
            f"{checkpoint} does not fit the model in the run's {CONFIG_FILE}: "
            f"{state_dict_mismatch(err)}"
        ) from None
    step = checkpoint.name.removeprefix("step_").lstrip("0") or "0"
    card = f"# DIM encoder at training step {step}\n\nExported from {checkpoint}.\n"
    return export_encoder(encoder, folder, meta, card=card)


def read_export_meta(folder: str | Path) -> dict:
    """The model config of a model folder (the ``dim`` block of its ``config.json``)."""
    meta = dict(json.loads((Path(folder) / EXPORT_CONFIG).read_text())["dim"])
    meta.pop("format", None)
    return meta


def load_encoder(path: str | Path, map_location: str = "cpu") -> DIMEncoder:
    """Rebuild a ``DIMEncoder`` from a model folder (or a run folder, or a file in one)."""

    folder = find_export(path)
    meta = read_export_meta(folder)
    files = (EXPORT_BACKBONE, EXPORT_HEAD)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"incomplete export at {folder}: {', '.join(missing)} missing")
    encoder = build_encoder(meta)
    backbone_file, head_file = (folder / name for name in files)
    try:
        encoder.backbone.load_state_dict(load_file(str(backbone_file), device=map_location))
    except RuntimeError as err:  # weights of another architecture or width
        raise ConfigError(
            f"{backbone_file} does not hold the {meta['backbone']!r} backbone its export "
            f"describes ({state_dict_mismatch(err)})"
        ) from None
    head = load_file(str(head_file), device=map_location)
    # A head of another width is reported with the key mismatches, not as torch's RuntimeError.
    shapes = {k: v.shape for k, v in encoder.state_dict().items()}
    resized = [k for k, v in head.items() if k in shapes and v.shape != shapes[k]]
    result = encoder.load_state_dict(
        {k: v for k, v in head.items() if k not in resized}, strict=False
    )  # the backbone was loaded above
    missing = [k for k in result.missing_keys if not k.startswith("backbone.")]
    if missing or result.unexpected_keys or resized:
        raise ConfigError(
            f"{head_file} does not match {meta['backbone']!r}: missing "
            f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}, other shape {resized[:3]}"
        )
    return encoder.eval()
