"""The speed section: the DIM step against its bare backbone, ``pretrain.py`` itself, and
one loader worker, each measured here; then what they imply (``pipeline.doctor.plan``)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline.core.schema import Config
from pipeline.data.augment import view_count
from pipeline.data.batch_augment import build_batch_augment
from pipeline.data.loaders import train_loader
from pipeline.data.shards import dataset_size
from pipeline.data.write import prepare_digits
from pipeline.doctor.machine import device_type
from pipeline.doctor.plan import allgather_rows, plan_rows
from pipeline.doctor.row import Row
from pipeline.doctor.runs import launch_env, short_run
from pipeline.doctor.training import random_images
from pipeline.models.encoder import create_backbone
from pipeline.models.speed import (
    apply_speed_options,
    in_model_layout,
    precision_name,
    resolve_precision,
)
from pipeline.objective.model import build_model

WARMUP, TIMED = 2, 5
LOADER_BATCHES = 5
LOOP_SECONDS, LOOP_STEPS, LOOP_TIMEOUT_S = 10, (30, 5000), 300
LOOP_OVERHEAD_WARN = 1.5  # the H200's paper recipe: 1.6x (130 bare vs 79-92 step/s)


def _timed_steps(steps: dict[str, Callable[[], None]], device: str) -> dict[str, float]:
    """Fastest of ``TIMED`` calls of each step after ``WARMUP``, the steps taking turns:
    other jobs only ever add time, and a change in the machine's load hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(WARMUP + TIMED):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= WARMUP:
                times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def _stepper(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], autocast
) -> Callable[[], None]:
    """Forward + backward + AdamW step of ``model``, as one training step does."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with autocast():
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _how(cfg: Config) -> str:
    """How both timed steps ran: compiled or eager, and in which precision."""
    chosen, _ = resolve_precision(cfg.train.mixed_precision, cuda=device_type() == "cuda")
    return f"{'compiled' if cfg.train.compile else 'eager'} {precision_name(chosen)}"


def step_speed(cfg: Config) -> dict[str, float]:
    """images/s of the DIM training step and of the bare backbone's, on one device.

    An image is one image of the data, whatever its number of views (each step encodes
    batch x views of them): the unit of the loop's ``samples_per_s`` and of the loader's
    rate, which these figures are compared with and divided by."""
    device = device_type()
    views = view_count(cfg.data)
    b, m = cfg.train.batch_size, cfg.model
    x = in_model_layout(random_images(cfg, views * b, seed=3, device=device), cfg.train)
    chosen, _ = resolve_precision(cfg.train.mixed_precision, cuda=device == "cuda")
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(chosen)

    def autocast():
        if precision is None:
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=precision)

    torch.manual_seed(cfg.train.seed)
    dim = apply_speed_options(build_model(cfg).to(device).train(), cfg.train)
    bare = create_backbone(m.backbone, in_chans=m.in_chans, img_size=m.img_size).to(device).train()
    if cfg.train.channels_last:
        bare.to(memory_format=torch.channels_last)
    if cfg.train.compile:  # as the DIM model's parts: the ratio compares like with like
        bare.compile()
    seconds = _timed_steps(
        {
            "dim": _stepper(dim, lambda net: net(*x.chunk(views))[0], autocast),
            "bare": _stepper(bare, lambda net: net(x).mean(), autocast),
        },
        device,
    )
    return {name: b / s for name, s in seconds.items()} | {"views": views}


def loop_speed(
    config: str | None, overrides: list[str], shards: str, step_ips: float, batch: int
) -> tuple[float, int]:
    """(images/s, steps) of ``pretrain.py`` itself on one device: the configuration's
    loader and workers, the host-to-device copy, device augmentation, the per-step
    agreement and logging, which the bare step leaves out. About ``LOOP_SECONDS`` of
    steps, sized by the bare step's rate; the median of the rows after the first third."""
    steps = round(min(max(LOOP_SECONDS * step_ips / batch, LOOP_STEPS[0]), LOOP_STEPS[1]))
    env = launch_env(two_cpu_ranks=False)
    if torch.cuda.is_available():  # one process, on the first GPU
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    run = short_run(
        [sys.executable],
        config,
        overrides,
        shards,
        steps=steps,
        log_every=max(steps // 15, 1),
        env=env,
        timeout=LOOP_TIMEOUT_S,
    )
    if run.returncode != 0:
        raise RuntimeError(f"pretrain.py exit {run.returncode}: {run.last_line}")
    rates = [r["samples_per_s"] for r in run.rows]
    late = sorted(rates[len(rates) // 3 :])
    return late[len(late) // 2], steps


def default_shards(folder: Path) -> str:
    """The embedded default data (digits) as training does, written into ``folder``."""
    return str(prepare_digits(folder))


def loader_speed(cfg: Config, shards: str) -> float:
    """images/s of one loader worker: read, decode, (batch-)augment, in this process."""
    data = dataclasses.replace(cfg.data, train_shards=shards, num_workers=0)
    augment = build_batch_augment(data, img_size=cfg.model.img_size, seed=cfg.train.seed, rank=0)
    loader = train_loader(
        data,
        batch_size=cfg.train.batch_size,
        img_size=cfg.model.img_size,
        in_chans=cfg.model.in_chans,
        seed=cfg.train.seed,
        rank=0,
        world_size=1,
    )
    batches, threads = iter(loader), torch.get_num_threads()
    torch.set_num_threads(1)  # what one worker has
    try:
        seen, t0 = 0, 0.0
        for i in range(1 + LOADER_BATCHES):  # the first batch fills the shuffle buffer
            if i == 1:
                t0 = time.perf_counter()
            batch = next(batches)
            if augment is not None:
                augment(batch["image"], step=i)
            seen += len(batch["image"]) if i else 0
        return seen / (time.perf_counter() - t0)
    finally:
        loader.close()
        torch.set_num_threads(threads)


def overhead_row(ratio: float, device: str) -> Row:
    """The loop's time per step over the bare step's, with what to try where it is high."""
    high = ratio > LOOP_OVERHEAD_WARN
    if device == "cpu":
        why = "on a CPU node the loader's workers and the step share the cores"
    else:
        why = "the device waits on the host: a larger batch, or more loader workers, help"
    return Row(
        "speed",
        "loop / bare DIM step time",
        f"{ratio:.2f}x",
        ratio,
        "ratio",
        "warn" if high else "info",
        "what a training step costs beyond its arithmetic"
        + (f"; > {LOOP_OVERHEAD_WARN}x: {why}" if high else ""),
    )


def speed_rows(cfg: Config, config: str | None, overrides: list[str], shards: str) -> list[Row]:
    step = step_speed(cfg)
    worker = loader_speed(cfg, shards)
    device = device_type()
    loop, loop_steps = loop_speed(config, overrides, shards, step["dim"], cfg.train.batch_size)
    rows = [
        Row(
            "speed",
            "DIM step img/s per device",
            f"{step['dim']:.0f} on {device}",
            step["dim"],
            "img/s",
            "info",
            f"forward+backward+AdamW on {torch.get_num_threads()} intra-op thread(s), "
            f"batch {cfg.train.batch_size} x {step['views']} view(s), images of the data "
            f"(each encoded {step['views']}x), "
            f"{cfg.model.img_size} px, {_how(cfg)}, fastest of {TIMED} after {WARMUP} warm-up",
        ),
        Row(
            "speed",
            "bare backbone img/s per device",
            f"{step['bare']:.0f} on {device}",
            step["bare"],
            "img/s",
            "info",
            f"{cfg.model.backbone}, same batch, {_how(cfg)}, mean of its features as the loss",
        ),
        Row(
            "speed",
            "DIM / bare step time",
            f"{step['bare'] / step['dim']:.2f}x",
            step["bare"] / step["dim"],
            "ratio",
            "info",
            "the cost of DIM's heads, critics and estimator",
        ),
        Row(
            "speed",
            "input img/s per worker",
            f"{worker:.0f}",
            worker,
            "img/s",
            "info",
            f"train_loader on {shards}, num_workers=0, one thread, decoded and augmented "
            f"(batch augmentation on the CPU: on a GPU node it runs on the device), "
            f"{LOADER_BATCHES} batches",
        ),
    ]
    rows += [
        Row(
            "speed",
            "training loop img/s per device",
            f"{loop:.0f} on {device}",
            loop,
            "img/s",
            "info",
            f"pretrain.py itself, {loop_steps} steps, data.num_workers={cfg.data.num_workers}: "
            "the loader, device copy and augmentation, per-step agreement and logging "
            "besides the step; median of the rows after the first third",
        ),
        overhead_row(step["dim"] / loop, device),
    ]
    epoch = cfg.data.epoch_samples or dataset_size(shards)
    rows += plan_rows(cfg, step["dim"], loop, worker, epoch)
    return rows + allgather_rows(cfg, step["views"])
