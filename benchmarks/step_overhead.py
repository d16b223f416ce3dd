"""What DIM costs on top of the backbone: one training step, DIM vs the bare backbone.

    python benchmarks/step_overhead.py --backbones resnet18,resnet50 --sizes 32,64 --batch 64
    python benchmarks/step_overhead.py --config configs/cifar10_cpu.yaml --views 2 --compile

DIM step: encoder (backbone intermediates + fc -> mu, logvar, z) + critics + estimator
loss, forward + backward + AdamW step. Baseline: the same timm backbone's forward
(pooled features, mean as the loss) + backward + AdamW step, same batch and input size.
Also times the DIM encoder alone (its z.mean() as the loss), to split the overhead
between the encoder head and the critics + estimators. Prints the fastest step of
each and their ratios (the target for dot critics is DIM/bare <= 1.15x), in wall time,
in CPU time and in FLOPs (forward + backward, torch's FLOP counter), and the median
over rounds of DIM/bare within one round ("paired"; quartiles beside it), which a
drift of the machine's speed during the run moves least. Single
process: the cross-device gather is the identity here. "cpu" ratios use the process's
CPU time (``time.process_time``), which on one thread leaves out the time other jobs
held the cores: steadier than wall time on a shared machine (GPU steps: use wall).
``--views 2``: DIM gets two views of the batch (the encoder runs on 2B images), so the
baseline runs on 2B too.
``train.keep_freed_memory`` (on unless overridden to false) is applied as training applies
it, to all three models alike; it is process-wide, so compare it on and off in two runs.
``--before KEY=VALUE`` (repeatable) also times DIM with those overrides on top, step by
step beside the others: a change's before and after in one run (e.g. ``--before
loss.local_positions=0`` on ``configs/cifar10_cpu.yaml``).
``--compile`` / ``--channels-last``: the ``train.compile`` / ``train.channels_last``
options, applied to all three models alike (compilation happens in the warm-up steps);
an eager copy of DIM then alternates with them, for compiled (or NHWC) vs eager.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from pipeline.config import load_config
from pipeline.core.cli import comma_separated, exit_on_mistake
from pipeline.models.encoder import create_backbone
from pipeline.models.speed import apply_speed_options, in_model_layout, keep_freed_memory
from pipeline.objective.model import build_model


class Stepper:
    """One forward + backward + AdamW step of ``model`` under ``loss_fn``, timed."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        self.model, self.loss_fn = model.train(), loss_fn
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.times: list[float] = []
        self.cpu: list[float] = []

    def step(self, x: torch.Tensor, record: bool) -> None:
        """One step on ``x`` (a list of views for DIM: the model gets them as arguments)."""
        if x.is_cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        self.loss_fn(self.model, x).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
        if record:
            self.times.append(time.perf_counter() - t0)
            self.cpu.append(time.process_time() - c0)


def step_flops(model: torch.nn.Module, loss_fn, x: torch.Tensor) -> int:
    """Floating-point operations of one forward + backward (torch's FLOP counter): exact,
    so the FLOP ratio is the one figure here that other jobs on the machine cannot move."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_fn(model, x).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(
    backbone: str | None,
    size: int,
    batch: int,
    overrides: list[str],
    steps: int,
    warmup: int,
    device: str,
    *,
    config: str | None = None,
    views: int = 1,
    before: list[str] | None = None,
) -> dict:
    """Fastest step, in seconds, of the bare backbone, the DIM encoder alone and full DIM
    (and of eager DIM when compile or channels_last is on, and of DIM with the ``before``
    overrides on top when given), FLOPs of bare and DIM, the
    quartiles of the per-round DIM/bare ratio, and the backbone (``None``: the config's).

    The models alternate step by step and the minimum over steps is kept: on a shared
    machine other processes only ever add time, so the minimum is the least noisy
    estimate of each step's own cost.
    """
    torch.manual_seed(0)
    chosen = [f"model.backbone={backbone}"] if backbone else []
    cfg = load_config(config, [*chosen, f"model.img_size={size}", *overrides])
    backbone = cfg.model.backbone
    tc = cfg.train
    x = in_model_layout(
        torch.randn(views * batch, cfg.model.in_chans, size, size, device=device), tc
    )
    bare = create_backbone(backbone, in_chans=cfg.model.in_chans, img_size=size).to(device)
    dim = build_model(cfg).to(device)
    encoder_only = copy.deepcopy(dim.encoder)
    losses = {
        "bare": lambda m, x: m(x).mean(),
        "encoder": lambda m, x: m(x).z.mean(),
        "dim": lambda m, x: m(*x.chunk(views))[0],
    }
    flops = {
        "bare_flops": step_flops(bare, losses["bare"], x),
        "dim_flops": step_flops(dim, losses["dim"], x),
    }
    models = {"bare": bare, "encoder": encoder_only, "dim": dim}
    if tc.compile or tc.channels_last:
        models["eager"] = copy.deepcopy(dim)
        losses["eager"] = losses["dim"]
    if before:
        old = load_config(config, [*chosen, f"model.img_size={size}", *overrides, *before])
        old_model = build_model(old).to(device)
        flops["before_flops"] = step_flops(old_model, losses["dim"], x)
        models["before"] = apply_speed_options(old_model, tc)
        losses["before"] = losses["dim"]
    for model in (bare, encoder_only):
        if tc.channels_last:
            model.to(memory_format=torch.channels_last)
        if tc.compile:
            model.compile()
    apply_speed_options(dim, tc)
    plain = x.contiguous()
    steppers = {name: Stepper(m, losses[name]) for name, m in models.items()}
    for i in range(warmup + steps):
        for name, s in steppers.items():
            s.step(plain if name == "eager" else x, record=i >= warmup)
    paired = [d / b for d, b in zip(steppers["dim"].times, steppers["bare"].times, strict=True)]
    return {
        "backbone": backbone,
        "paired": statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3,
        **{name: min(s.times) for name, s in steppers.items()},
        **{f"{name}_cpu": min(s.cpu) for name, s in steppers.items()},
        **flops,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--backbones",
        type=comma_separated(),
        default=None,
        help="comma-separated (default: the config's, else resnet18)",
    )
    p.add_argument("--sizes", type=comma_separated(int), default="32,64")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default=None, help="start from this YAML (default: built-in)")
    p.add_argument("--views", type=int, default=1, choices=(1, 2))
    p.add_argument("--compile", action="store_true", help="train.compile=true for all three")
    p.add_argument("--channels-last", action="store_true", help="train.channels_last=true")
    p.add_argument(
        "--before",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also time DIM with this override on top (repeatable): before vs after in one run",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="config overrides, e.g. loss.estimator=jsd (default: the dot critics with infoNCE)",
    )
    args = p.parse_args(argv)
    args.overrides += ["train.compile=true"] * args.compile + [
        "train.channels_last=true"
    ] * args.channels_last
    load_config(args.config, [*args.overrides, *args.before])  # a mistake: one line, now
    kept = keep_freed_memory(load_config(args.config, args.overrides).train.keep_freed_memory)
    print(
        f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} "
        f"keep_freed_memory={kept} "
        f"views={args.views} config={args.config or '(built-in)'} load={os.getloadavg()[0]:.1f} "
        f"overrides={' '.join(args.overrides) or '(defaults: infonce, dot critics)'}"
    )
    optimised = args.compile or args.channels_last
    print(
        f"{'backbone':<20}{'size':>5}{'bare ms':>10}{'encoder ms':>12}{'DIM ms':>10}"
        f"{'enc/bare':>10}{'DIM/bare':>10}{'cpu':>7}{'flops':>7}{'paired (q1-q3)':>20}"
        + (f"{'eager DIM ms':>14}{'DIM/eager':>10}{'cpu':>7}" if optimised else "")
        + (
            f"{'before ms':>11}{'before/bare':>13}{'DIM/before':>12}{'flops':>7}"
            if args.before
            else ""
        )
    )
    if args.backbones:
        backbones = args.backbones
    else:  # None: the config's own backbone; without a config, resnet18 (not dim_conv32)
        backbones = [None] if args.config else ["resnet18"]
    for backbone in backbones:
        for size in args.sizes:
            t = measure(
                backbone,
                size,
                args.batch,
                args.overrides,
                args.steps,
                args.warmup,
                args.device,
                config=args.config,
                views=args.views,
                before=args.before,
            )
            q = t["paired"]
            print(
                f"{t['backbone']:<20}{size:>5}{1e3 * t['bare']:>10.1f}{1e3 * t['encoder']:>12.1f}"
                f"{1e3 * t['dim']:>10.1f}{t['encoder'] / t['bare']:>10.3f}"
                f"{t['dim'] / t['bare']:>10.3f}{t['dim_cpu'] / t['bare_cpu']:>7.3f}"
                f"{t['dim_flops'] / t['bare_flops']:>7.3f}"
                f"{q[1]:>9.3f} ({q[0]:.3f}-{q[2]:.3f})"
                + (
                    f"{1e3 * t['eager']:>14.1f}{t['dim'] / t['eager']:>10.3f}"
                    f"{t['dim_cpu'] / t['eager_cpu']:>7.3f}"
                    if optimised
                    else ""
                )
                + (
                    f"{1e3 * t['before']:>11.1f}{t['before'] / t['bare']:>13.3f}"
                    f"{t['dim'] / t['before']:>12.3f}{t['dim_flops'] / t['before_flops']:>7.3f}"
                    if args.before
                    else ""
                )
                + f"  (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    exit_on_mistake("step_overhead.py", main)
