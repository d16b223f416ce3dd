"""One optimizer step, and what the ranks agree on after it.

``TrainStep`` runs ``train.grad_accum`` micro-batches (device augmentation, forward,
backward), clips and steps the optimizer and the schedule. ``agree`` is the step's one
all-reduce: the stop flag, the skipped-sample count and the loss terms, so every rank
stops at the same step and sees the same means; ``raise_if_nonfinite`` then stops all of
them on a NaN, naming the step and the term. DeepSpeed's half precision needs two things
its engine leaves undone: BatchNorm buffers in the weights' dtype, and autocast.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from pipeline.core.schema import Config
from pipeline.data.batch_augment import build_batch_augment
from pipeline.data.loaders import batch_views
from pipeline.models.speed import in_model_layout
from pipeline.train.batches import TrainBatches

__all__ = [
    "NonFiniteLoss",
    "StepResult",
    "TrainStep",
    "Vote",
    "agree",
    "autocast_inside_deepspeed",
    "deepspeed_half_dtype",
    "raise_if_nonfinite",
    "recast_batchnorm_for_deepspeed",
]


class NonFiniteLoss(RuntimeError):
    """The loss or one of its terms became NaN or infinite."""


def deepspeed_half_dtype(accelerator):
    """The dtype DeepSpeed's ``bf16`` / ``fp16`` setting trains in, or None (no DeepSpeed,
    or full precision)."""

    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config if plugin is not None else {}
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ds.get(key, {}).get("enabled") is True:
            return dtype
    return None


def recast_batchnorm_for_deepspeed(accelerator, model) -> None:
    """Under DeepSpeed bf16/fp16, cast the BatchNorm running statistics to the weights'
    dtype: the engine casts the weights but not these buffers. Nothing otherwise."""

    dtype = deepspeed_half_dtype(accelerator)
    if dtype is None:
        return
    for m in accelerator.unwrap_model(model).modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.running_mean.data = m.running_mean.data.to(dtype)
            m.running_var.data = m.running_var.data.to(dtype)


def autocast_inside_deepspeed(accelerator, model) -> None:
    """Under DeepSpeed bf16/fp16, run the DIM model's forward and its encoder's under
    autocast; nothing otherwise (under DDP, accelerate's ``prepare`` wraps the forward).

    The engine casts the weights but not the inputs, so the forward needs autocast. An
    autocast entered around the engine's call does not reach the model: on a GPU the engine
    switches an outer autocast off unless its own ``torch_autocast`` section is on
    (``deepspeed.runtime.torch_autocast``). So autocast goes inside, around the wrapped
    modules' own ``forward``: the engine's and the online probe's calls (the encoder
    alone) both run in the engine's dtype."""

    dtype = deepspeed_half_dtype(accelerator)
    if dtype is None:
        return
    inner = accelerator.unwrap_model(model)
    for module in (inner, getattr(inner, "encoder", None)):
        if module is not None:
            module.forward = torch.autocast(accelerator.device.type, dtype=dtype)(module.forward)


@dataclasses.dataclass
class StepResult:
    """This rank's part of one step: the loss terms averaged over the micro-batches, the
    loader's skipped-sample count, the gradient norm before clipping, and the learning
    rate the step used (the schedule is stepped after it, so reading it then would give
    the next step's)."""

    sums: dict
    skipped: int
    grad_norm: float | None
    lr: float


class TrainStep:
    """One optimizer step: ``train.grad_accum`` micro-batches, each moved to the device,
    augmented and run forward and backward; gradients clipped, then the optimizer and
    the schedule stepped. Made with the model in train mode."""

    def __init__(self, accelerator, cfg: Config, model, optimizer, scheduler):

        self.accelerator, self.tc = accelerator, cfg.train
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Random crops, jitter and the second view on the step's device, drawn from
        # (seed, rank, step): a resumed run augments step k as the first run did.
        self.augment = build_batch_augment(
            cfg.data,
            img_size=cfg.model.img_size,
            seed=cfg.train.seed,
            rank=accelerator.process_index,
        )
        model.train()  # the probe leaves it so as well

    def views(self, batch: dict, step: int, micro: int) -> list[torch.Tensor]:
        """The image's views on the device, augmented, in the step's layout."""

        device = self.accelerator.device
        images = [view.to(device, non_blocking=True) for view in batch_views(batch)]
        if self.augment is not None:
            images = self.augment(images[0], step, micro)
        return [in_model_layout(view, self.tc) for view in images]

    def __call__(self, batches: TrainBatches, step: int) -> StepResult:
        accelerator, tc = self.accelerator, self.tc
        sums: dict = {}
        skipped, grad_norm = 0, None
        lr = self.scheduler.get_last_lr()[0]  # what this step's optimizer.step() applies
        for micro in range(tc.grad_accum):
            batch = next(batches)
            views = self.views(batch, step, micro)
            skipped = int(batch.get("skipped", 0))
            with accelerator.accumulate(self.model):
                loss, terms = self.model(*views)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(self.params, tc.grad_clip or math.inf)
                self.optimizer.step()  # a no-op until the last micro-batch of the step
                if accelerator.sync_gradients:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.float() / tc.grad_accum
        return StepResult(sums, skipped, grad_norm, lr)


class Vote(NamedTuple):
    """What every rank agrees on after a step."""

    stopping: bool  # some rank got a stop signal
    skipped: int  # skipped samples, all ranks
    means: dict[str, float]  # the loss terms, averaged over ranks
    seconds: float = 0.0  # the ranks' clocks (seconds into the run, resumes included), averaged


def agree(accelerator, stop: bool, skipped: int, sums: dict, seconds: float = 0.0) -> Vote:
    """The one all-reduce of a step. Every rank gets the same answers, so all stop at the
    same step, all see a NaN or inf that any rank's terms hold, and all read one clock
    (what a time budget plans from: ``pipeline.train.budget``)."""

    keys = sorted(sums)
    head = torch.tensor([float(stop), float(skipped), seconds], device=accelerator.device)
    vec = torch.cat([head.float(), torch.stack([sums[k].detach().float() for k in keys])])
    world = accelerator.num_processes
    vec = accelerator.reduce(vec, reduction="sum") if world > 1 else vec
    flag, skipped_total, clock, *values = vec.tolist()
    means = {k: v / world for k, v in zip(keys, values, strict=True)}
    return Vote(flag > 0, int(skipped_total), means, clock / world)


def raise_if_nonfinite(means: dict[str, float], step: int) -> None:
    """NonFiniteLoss naming the step and the terms that are NaN or infinite."""
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteLoss(
            f"non-finite loss at step {step}: {', '.join(bad)} "
            f"({', '.join(f'{k}={means[k]}' for k in bad)})"
        )
