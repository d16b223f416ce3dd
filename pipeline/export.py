"""Export a trained encoder and load it back.

The backbone is written as timm's own state dict (``timm.create_model(backbone,
num_classes=0, **backbone_kwargs)`` loads it strictly); the DIM head and the model
config needed to rebuild the whole ``DIMEncoder`` sit beside it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .encoder import DIMEncoder
from .errors import ConfigError

__all__ = ["EXPORT_BACKBONE", "EXPORT_HEAD", "EXPORT_META", "encoder_from_meta",
           "export_encoder", "load_encoder"]

EXPORT_BACKBONE = "encoder.safetensors"   # timm state dict of the backbone alone
EXPORT_HEAD = "head.safetensors"          # fc, mu, logvar of the DIM head
EXPORT_META = "encoder.json"              # what it takes to rebuild both


def export_encoder(encoder: DIMEncoder, folder: str | Path, meta: dict) -> Path:
    """Write the backbone as a timm state dict, the head, and a JSON to rebuild them.

    ``timm.create_model(backbone, pretrained=False, num_classes=0, **backbone_kwargs)``
    loads ``encoder.safetensors`` with ``strict=True``. ``meta`` holds the model config
    (backbone, code_dim, fc_dim, local_layer, img_size, in_chans, backbone_kwargs).
    Files are written to temporary names and renamed, so a reader never sees half a file.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    head = {k: v for k, v in encoder.state_dict().items() if not k.startswith("backbone.")}
    backbone = {k: v.detach().contiguous().cpu() for k, v in encoder.backbone.state_dict().items()}
    for name, tensors in ((EXPORT_BACKBONE, backbone), (EXPORT_HEAD, head)):
        tmp = folder / (name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, folder / name)
    tmp = folder / (EXPORT_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / EXPORT_META)
    return folder / EXPORT_BACKBONE


def load_encoder(path: str | Path, map_location: str = "cpu") -> DIMEncoder:
    """Rebuild a ``DIMEncoder`` from an export folder (or its ``encoder.safetensors``)."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path.parent if path.is_file() else path
    meta_file = folder / EXPORT_META
    if not meta_file.is_file():
        raise ConfigError(f"no exported encoder at {path}: {meta_file} is missing")
    meta = json.loads(meta_file.read_text())
    encoder = encoder_from_meta(meta)
    encoder.backbone.load_state_dict(load_file(str(folder / EXPORT_BACKBONE), device=map_location))
    result = encoder.load_state_dict(load_file(str(folder / EXPORT_HEAD), device=map_location),
                                     strict=False)  # the backbone was loaded above
    missing = [k for k in result.missing_keys if not k.startswith("backbone.")]
    if missing or result.unexpected_keys:
        raise ConfigError(f"{folder / EXPORT_HEAD} does not match {meta['backbone']!r}: missing "
                          f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    return encoder.eval()


def encoder_from_meta(meta: dict) -> DIMEncoder:
    """A freshly initialised ``DIMEncoder`` of the architecture ``meta`` describes."""
    return DIMEncoder(meta["backbone"], code_dim=meta["code_dim"], fc_dim=meta["fc_dim"],
                      local_layer=meta["local_layer"], in_chans=meta["in_chans"],
                      img_size=meta["img_size"], backbone_kwargs=meta.get("backbone_kwargs"))
