"""What the measured rates imply: loader workers per device, whether the cores can feed
the devices, epoch and run time on 1, 8 and 64 nodes (linear scaling assumed, and said),
and the bytes the infoNCE all-gather moves per step."""

from __future__ import annotations

import math

import torch

from pipeline.core.files import human_bytes
from pipeline.core.schema import Config
from pipeline.doctor.machine import device_type, local_devices
from pipeline.doctor.row import Row
from pipeline.doctor.training import random_images
from pipeline.objective.loss import GLOBAL_INPUTS
from pipeline.objective.model import build_model
from pipeline.train.threads import usable_cores

NODES = (1, 8, 64)


def gathered_bytes_per_sample(cfg: Config) -> dict[str, int]:
    """Bytes per image of what infoNCE gathers, per scope: the image-side critic
    embeddings (global, local), in fp32, as the objective computes them."""
    if cfg.loss.estimator != "infonce":
        return {}
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model.encoder(random_images(cfg, 2, seed=4))
        sides = {
            "global": (
                model.objective.global_critic,
                GLOBAL_INPUTS[cfg.loss.global_input].take(out),
            ),
            "local": (model.objective.local_critic, out.local),
        }
        return {
            scope: critic.embed_a(side.float()).numel() // 2 * 4
            for scope, (critic, side) in sides.items()
            if critic is not None
        }


def allgather_rows(cfg: Config, views: int) -> list[Row]:
    per_sample = gathered_bytes_per_sample(cfg)
    check = "infoNCE all-gather per step, per process (forward)"
    if not per_sample:
        why = f"loss.estimator={cfg.loss.estimator} keeps negatives on the device"
        return [Row("speed", check, "nothing gathered", 0.0, "bytes", "info", why)]
    e = sum(per_sample.values())
    b = cfg.train.batch_size
    formula = (
        f"V x (W-1)/W x W*B x e (each view gathered once), B={b}, V={views}, e={e} bytes "
        f"({', '.join(f'{k} {v}' for k, v in per_sample.items())}); the backward moves as much"
    )
    rows = []
    for nodes in NODES:
        w = nodes * local_devices()
        moved = views * (w - 1) * b * e
        rows.append(
            Row("speed", f"{check}, W={w}", human_bytes(moved), moved, "bytes", "info", formula)
        )
    return rows


def plan_rows(
    cfg: Config, step_ips: float, loop_ips: float, worker_ips: float, epoch: int | None
) -> list[Row]:
    """What the measured rates imply for this node and for N nodes: each device runs at
    the slower of the bare step and the training loop, and the cores must feed them."""
    cores, devices = usable_cores(), local_devices()
    workers = math.ceil(step_ips / worker_ips)
    spare = max(cores - devices, 1)  # one core drives each device's training process
    fed = workers * devices <= spare
    device_ips = min(step_ips, loop_ips)
    node_ips = min(device_ips * devices, worker_ips * spare)
    limit = "devices" if device_ips * devices <= worker_ips * spare else "input (CPU cores)"
    rows = [
        Row(
            "speed",
            "loader workers per device needed",
            f"ceil({step_ips:.0f} / {worker_ips:.0f})",
            workers,
            "workers",
            "info",
            "DIM step img/s over one worker's img/s",
        ),
        Row(
            "speed",
            "cores can feed the devices",
            f"{workers} x {devices} workers vs {spare} spare cores",
            spare,
            "cores",
            "pass" if fed else "warn",
            f"spare = usable cores - one per device; node limited by {limit}"
            + (
                "; on a CPU node the step and the workers share the same cores"
                if device_type() == "cpu"
                else ""
            ),
        ),
        Row(
            "speed",
            "node img/s",
            f"{node_ips:.0f}",
            node_ips,
            "img/s",
            "info",
            "min(devices x min(step, loop) img/s, spare cores x worker img/s)",
        ),
    ]
    run_images = cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum
    for nodes in NODES:
        total = node_ips * nodes
        if epoch:
            rows.append(
                Row(
                    "speed",
                    f"epoch on {nodes} node(s)",
                    _human_time(epoch / total),
                    epoch / total,
                    "s",
                    "info",
                    f"{epoch} images; linear scaling assumed",
                )
            )
        seconds = run_images * devices * nodes / total
        rows.append(
            Row(
                "speed",
                f"train.max_steps on {nodes} node(s)",
                _human_time(seconds),
                seconds,
                "s",
                "info",
                f"{cfg.train.max_steps} steps x batch_size per process: the global batch "
                "grows with the nodes, so the time does not shrink; linear scaling assumed",
            )
        )
    if cfg.train.max_minutes:
        per_step = cfg.train.batch_size * cfg.train.grad_accum * devices
        steps = min(cfg.train.max_steps, int(cfg.train.max_minutes * 60 * node_ips / per_step))
        rows.append(
            Row(
                "speed",
                "steps in train.max_minutes on 1 node",
                f"{steps:,}",
                steps,
                "steps",
                "info",
                f"{cfg.train.max_minutes:g} min x node img/s / images per step, at most "
                "train.max_steps; the run plans its own from its pace, compiling and probes "
                "included (docs/training.md, A time budget)",
            )
        )
    if not epoch:
        rows.append(
            Row(
                "speed",
                "epoch",
                "unknown size",
                None,
                "",
                "skip",
                "no manifest and data.epoch_samples=0",
            )
        )
    return rows


def _human_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
