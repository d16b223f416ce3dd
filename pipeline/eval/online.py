"""Online probe during pretraining: is the representation getting more useful?

``online_probe(encoder, cfg, device)`` embeds up to ``bank_samples`` labelled images of
``cfg.data.train_shards`` (the eval stream: resized and normalised, no augmentation)
as a k-NN memory bank, and up to ``query_samples`` of ``cfg.data.val_shards`` as
queries; it returns ``{"probe/knn": acc, "probe/linear": acc}`` on the ``conv`` view,
from the probes ``pipeline.evaluate`` runs (``pipeline.eval.probes.run_probes``), with one linear
fit at a middle L2 strength instead of a search: a trend line, not the final figure.

The decoded images are cached per process, so a probe every few hundred steps costs
two forward passes over a few thousand images, not a re-read of the shards.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from pipeline.core.schema import Config
from pipeline.data.loaders import eval_loader
from pipeline.eval.features import extract_features
from pipeline.eval.probes import ProbeSettings, run_probes
from pipeline.share.tracking import ONLINE_PROBE, ONLINE_PROBES

__all__ = ["ONLINE", "labelled_images", "online_probe"]

BATCH = 256
ONLINE = ProbeSettings(l2_grid=(1e-3,), max_iter=100)  # cheap enough to run every few steps


@lru_cache(maxsize=4)
def labelled_images(
    spec: str,
    limit: int,
    img_size: int,
    in_chans: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` labelled images of ``spec`` (deterministic order), cached."""

    images, labels, seen = [], [], 0
    for batch in eval_loader(spec, batch_size=BATCH, img_size=img_size, in_chans=in_chans):
        keep = batch["label"] >= 0  # unlabelled samples carry -1
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
        seen += int(keep.sum())
        if seen >= limit:
            break
    if not labels:
        return torch.empty(0, in_chans, img_size, img_size), torch.empty(0, dtype=torch.long)
    return torch.cat(images)[:limit], torch.cat(labels)[:limit]


def _batches(images: torch.Tensor, labels: torch.Tensor):
    for start in range(0, len(labels), BATCH):
        yield {"image": images[start : start + BATCH], "label": labels[start : start + BATCH]}


def online_probe(
    encoder: nn.Module,
    cfg: Config,
    device: torch.device | str,
    *,
    bank_samples: int = 5000,
    query_samples: int = 2000,
    probes: tuple[str, ...] = ONLINE_PROBES,
    settings: ProbeSettings = ONLINE,
    view: str = "conv",
) -> dict[str, float]:
    """The accuracy of each of ``probes`` on held-out labelled images, keyed ``probe/<name>``.

    Returns ``{}`` when there is no labelled train/val data to probe with. The encoder's
    train/eval state is left as it was found.
    """
    if not cfg.data.train_shards or not cfg.data.val_shards:
        return {}
    m = cfg.model
    bank_x, bank_y = labelled_images(cfg.data.train_shards, bank_samples, m.img_size, m.in_chans)
    query_x, query_y = labelled_images(cfg.data.val_shards, query_samples, m.img_size, m.in_chans)
    if len(bank_y) == 0 or len(query_y) == 0:
        return {}
    bank, _ = extract_features({"m": encoder}, _batches(bank_x, bank_y), device=device)
    query, _ = extract_features({"m": encoder}, _batches(query_x, query_y), device=device)
    scores = run_probes(probes, bank["m"][view], bank_y, query["m"][view], query_y, settings)
    return {ONLINE_PROBE + name: score.accuracy for name, score in scores.items()}
