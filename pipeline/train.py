"""The pretraining loop: ``accelerate launch pretrain.py [--config FILE] [key=value ...]``.

One Accelerator drives plain DDP (CPU gloo or GPU NCCL) and DeepSpeed ZeRO 1/2 alike;
the launch form comes from the accelerate config file (see ``launch/``). Each rank reads
its own data stream (the loader is never passed through ``accelerator.prepare``).

A "step" is one optimizer step (``train.grad_accum`` micro-batches). Once per step the
ranks all-reduce one small vector: the stop flag (SIGTERM / SIGUSR1), the loss terms
and the skipped-sample count, so every rank agrees on when to stop, a NaN anywhere stops
all of them with the step and the term named, and the log holds cross-rank means.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

from .config import Config, describe, load_config, save_config
from .errors import ConfigError

__all__ = ["main", "parse_args", "train"]

USAGE = """pretrain.py [--config FILE] [key=value ...]

Deep InfoMax pretraining. Configuration: the defaults below, then FILE (YAML), then the
dotted overrides. Launch with `accelerate launch [--config_file launch/X.yaml] pretrain.py`
for several processes. A run resumes from the latest checkpoint in train.output_dir;
a folder holding a run of another configuration is refused (see --force-config).
"""


class NonFiniteLoss(RuntimeError):
    """The loss or one of its terms became NaN or infinite."""


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    """(the config, whether --force-config was given)."""
    p = argparse.ArgumentParser(
        prog="pretrain.py",
        usage=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="keys (with defaults):\n" + describe(),
    )
    p.add_argument("--config", default=None, help="YAML file with any of the sections below")
    p.add_argument(
        "--force-config",
        action="store_true",
        help="continue the run in train.output_dir even though its saved "
        "config.yaml differs (the new config replaces it)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. train.batch_size=64 loss.estimator=jsd",
    )
    args = p.parse_args(argv)
    return load_config(args.config, args.overrides), args.force_config


# ------------------------------------------------------------------ set-up helpers


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM preemption); acted on at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.raised = False
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    @contextlib.contextmanager
    def shielded_children(self):
        """Block the stop signals while data-loader workers may be started.

        Children inherit the signal mask, so a signal sent to every process of the job
        (SLURM signals the whole job step) does not kill the workers before the main
        process has saved. A signal that arrives meanwhile is delivered on unblocking.
        """
        old = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def make_accelerator(cfg: Config):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    no_gpu = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Without a GPU: cpu=True gives plain DDP on CPU, but it would switch DeepSpeed off,
    # and both need gloo named explicitly, or every rank believes it is rank 0 of 1.
    cpu = no_gpu and not deepspeed
    handlers = [InitProcessGroupKwargs(backend="gloo")] if no_gpu and launched else []
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds = plugin.deepspeed_config
        if str(ds.get("zero_optimization", {}).get("stage", 0)) == "3":
            raise ConfigError("DeepSpeed ZeRO stage 3 is not supported (use stage 1 or 2)")
        # No dataloader goes through prepare(), so accelerate cannot fill these "auto"s.
        ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        ds["train_batch_size"] = (
            cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
        )
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = cfg.train.grad_clip
    return accelerator


def deepspeed_half(accelerator, model):
    """Autocast for DeepSpeed bf16/fp16, whose engine casts the weights but neither the
    inputs nor the BatchNorm running statistics; the statistics are cast here to match.

    (Under DDP, accelerate's ``prepare`` already wraps the forward in autocast.)
    """
    import torch

    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config if plugin is not None else {}
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if ds.get(key, {}).get("enabled") is True:
            for m in accelerator.unwrap_model(model).modules():
                if (
                    isinstance(m, torch.nn.modules.batchnorm._NormBase)
                    and m.running_mean is not None
                ):
                    m.running_mean.data = m.running_mean.data.to(dtype)
                    m.running_var.data = m.running_var.data.to(dtype)
            return torch.autocast(accelerator.device.type, dtype=dtype)
    return contextlib.nullcontext()


def use_default_data(accelerator, cfg: Config) -> None:
    """The embedded default data: digits written as shards on first use (main first).

    Goes to ``$DIM_DEFAULT_DATA`` (default ``data/digits``); fills ``data.train_shards``
    and, when empty, ``data.val_shards`` (for the online probe).
    """
    from .prepare import prepare_digits

    folder = Path(os.environ.get("DIM_DEFAULT_DATA", "data/digits"))
    with accelerator.main_process_first():
        train_manifest = prepare_digits(folder)
    cfg.data.train_shards = str(train_manifest)
    val_manifest = train_manifest.parent / "val.json"
    if not cfg.data.val_shards and val_manifest.is_file():
        cfg.data.val_shards = str(val_manifest)


def report_receptive_field(accelerator, encoder, cfg: Config) -> None:
    """Log what one local-map location sees; warn when it sees the whole image, where
    local MI degenerates into telling whole images apart. Main process only: every rank
    holds the same architecture."""
    import warnings

    if not accelerator.is_main_process:
        return
    size = cfg.model.img_size
    rf = encoder.receptive_field(size)
    h = size // encoder.backbone.feature_info[encoder.local_index]["reduction"]
    accelerator.print(
        f"local map: stage {encoder.local_index} of {cfg.model.backbone} "
        f"(~{h}x{h}x{encoder.local_channels}), receptive field {rf} px of {size} px"
    )
    if rf >= size:
        warnings.warn(
            f"the local map (model.local_layer={cfg.model.local_layer}) sees the whole "
            f"{size} px input ({rf} px receptive field): local MI will not be local; "
            f"use an earlier stage or a small-image backbone (dim_conv32, resnet18_cifar)",
            stacklevel=2,
        )


def export(
    accelerator, model, cfg: Config, folder: Path, *, step: int, samples_seen: int, tracker=None
) -> Path:
    """Collective: the main process writes the model folder (pipeline.export) with its
    card, and logs it to W&B as a model artifact of this run. Returns the folder."""
    from .card import render_card
    from .export import export_encoder

    if accelerator.is_main_process:
        encoder = accelerator.unwrap_model(model).encoder
        wb = tracker.wandb_info() if tracker else None
        card = render_card(
            cfg.to_dict(),
            step=step,
            samples_seen=samples_seen,
            world_size=accelerator.num_processes,
            location=str(folder.resolve()),
            wandb_run=wb,
            name=f"{Path(cfg.train.output_dir).name}-{cfg.model.backbone}",
        )
        export_encoder(encoder, folder, dataclasses.asdict(cfg.model), card=card)
        if tracker:
            tracker.log_model(folder, step=step, final=step >= cfg.train.max_steps)
    accelerator.wait_for_everyone()
    return folder


def load_run(accelerator, ckpt: Path) -> dict:
    """Restore a checkpoint; one line when it does not fit the configured model."""
    from .checkpoint import load_checkpoint

    try:
        return load_checkpoint(accelerator, ckpt)  # restores RNG states as well
    except RuntimeError as err:  # e.g. "size mismatch for ...", "Missing key(s) ..."
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
        if len(detail) > 300:
            detail = detail[:300].rsplit(", ", 1)[0] + ", ..."
        raise ConfigError(
            f"checkpoint {ckpt} does not fit the configured model ({detail}); "
            f"start a new run with another train.output_dir"
        ) from None


def bar_fields(row: dict) -> dict[str, str]:
    """What the progress bar shows: loss, images/s over all ranks, the MI estimates."""
    fields = {"loss": f"{row['loss']:.3f}", "img/s": f"{row['samples_per_s_total']:.0f}"}
    fields.update(
        {k.removeprefix("mi/"): f"{v:.3f}" for k, v in row.items() if k.startswith("mi/")}
    )
    return fields


def run_probe(model, accelerator, cfg: Config) -> dict[str, float]:
    """The online probe (pipeline.probe) on the encoder in eval mode, if it is available."""
    try:
        from .probe import online_probe
    except ImportError:
        return {}
    from .features import eval_mode

    encoder = accelerator.unwrap_model(model).encoder
    with eval_mode(encoder):
        return online_probe(encoder, cfg, accelerator.device)


def plot(output_dir: Path) -> None:
    try:
        from .plots import plot_metrics
    except ImportError:
        return
    plot_metrics(output_dir / "metrics.jsonl", output_dir / "metrics.png")


# ------------------------------------------------------------------ the loop


def agree(accelerator, step: int, stop: bool, skipped: int, sums: dict) -> tuple[bool, int, dict]:
    """The one all-reduce of a step: (anyone stopping, total skipped, mean terms).

    Every rank gets the same answers, so all stop at the same step; a NaN or inf in any
    rank's terms shows up in the sum and stops every rank with the step and term named.
    """
    import torch

    keys = sorted(sums)
    flags = torch.tensor([float(stop), float(skipped)], device=accelerator.device)
    vec = torch.cat([flags, torch.stack([sums[k].detach().float() for k in keys])])
    world = accelerator.num_processes
    vec = accelerator.reduce(vec, reduction="sum") if world > 1 else vec
    flag, skipped_total, *values = vec.tolist()
    means = {k: v / world for k, v in zip(keys, values, strict=True)}
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteLoss(
            f"non-finite loss at step {step}: {', '.join(bad)} "
            f"({', '.join(f'{k}={means[k]}' for k in bad)})"
        )
    return flag > 0, int(skipped_total), means


def train(cfg: Config, force_config: bool = False) -> int:
    """Train (resuming if a checkpoint exists); returns the last step reached.

    Nothing is written into ``train.output_dir`` until the whole input has been checked:
    the config, the folder, the shards, the backbone, the folder's saved config and the
    first batch of data. A run that is complete says so and returns.
    """
    from .preflight import preflight

    preflight(cfg)  # before the heavy imports: a wrong path is reported in a blink
    import torch
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .batch_augment import build_batch_augment
    from .checkpoint import clean_partial, save_checkpoint
    from .data import train_loader
    from .export import EXPORT_CONFIG, EXPORT_DIR, remove_partial_export
    from .model import build_model
    from .optim import build_optimizer, build_scheduler
    from .run_folder import CONFIG_FILE, inspect_run
    from .speed import prepare_input, prepare_model
    from .tracking import Tracker

    stop = StopFlag()
    accelerator = make_accelerator(cfg)
    tc, out = cfg.train, Path(cfg.train.output_dir)
    world, main = accelerator.num_processes, accelerator.is_main_process
    if not cfg.data.train_shards:
        use_default_data(accelerator, cfg)
    state = inspect_run(
        out,
        cfg.to_dict(),
        Config().to_dict(),
        force=force_config,
        export_marker=f"{EXPORT_DIR}/{EXPORT_CONFIG}",
    )
    if state.complete(tc.max_steps) and state.exported:
        accelerator.print(
            f"{out} is complete: trained to step {state.step} "
            f"(train.max_steps={tc.max_steps}) and exported; raise "
            f"train.max_steps to train further"
        )
        accelerator.end_training()
        return state.step
    if state.changed:
        accelerator.print(f"--force-config: continuing {out} with {'; '.join(state.changed)}")
    finishing = state.complete(tc.max_steps)  # trained, killed before the export: export only
    step, samples_seen = state.step, state.samples_seen

    loader = batches = None
    pending: list[dict] = []

    def next_batch():
        nonlocal batches
        if pending:
            return pending.pop()
        with stop.shielded_children():
            try:
                return next(batches)
            except StopIteration:  # the end of an epoch: start the stream again
                batches = iter(loader)
                return next(batches)

    if not finishing:
        # A resampled stream cannot be rewound; reseeding with seed + step gives a resumed
        # run fresh, reproducible data instead of replaying the first batches.
        loader = train_loader(
            cfg.data,
            batch_size=tc.batch_size,
            img_size=cfg.model.img_size,
            in_chans=cfg.model.in_chans,
            seed=tc.seed + step,
            rank=accelerator.process_index,
            world_size=world,
        )
        atexit.register(loader.close)  # also on an exception: no worker left to wait for
        batches = iter(loader)
        pending.append(next_batch())  # unusable data stops here, before anything is written
    if main:
        out.mkdir(parents=True, exist_ok=True)
        clean_partial(out)
        remove_partial_export(out / EXPORT_DIR)
    accelerator.wait_for_everyone()

    set_seed(tc.seed)  # identical initial weights on every rank
    model = prepare_model(build_model(cfg), tc)  # channels_last, compile
    report_receptive_field(accelerator, model.encoder, cfg)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    autocast = deepspeed_half(accelerator, model)
    if state.checkpoint is not None:
        load_run(accelerator, state.checkpoint)
        accelerator.print(f"resumed from {state.checkpoint} at step {step}")
    else:
        set_seed(tc.seed, device_specific=True)  # per-rank noise, augmentations, negatives
    if main:  # only now: a config that does not fit the checkpoint never replaces its own
        save_config(cfg, out / CONFIG_FILE)

    # Random crops, jitter and the second view on the step's device, drawn from
    # (seed, rank, step): a resumed run augments step k as the first run did.
    augment = build_batch_augment(
        cfg.data, img_size=cfg.model.img_size, seed=tc.seed, rank=accelerator.process_index
    )
    tracker = Tracker(out, cfg.wandb, cfg.to_dict(), resume_step=step) if main else None  # (also
    # when only the export is left: it is logged as a model artifact of the same run)
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(
        total=tc.max_steps,
        initial=step,
        disable=not main or finishing,
        dynamic_ncols=True,
        unit="step",
    )
    redirect = logging_redirect_tqdm()  # warnings print above the bar, not through it
    redirect.__enter__()
    window = {"t": time.perf_counter(), "steps": 0}
    model.train()

    def save(tag: str) -> None:
        meta = {
            "samples_seen": samples_seen,
            "world_size": world,
            "tag": tag,
            "wandb_id": tracker.run_id if tracker else None,
        }
        path = save_checkpoint(accelerator, out, step, meta, tc.keep_last)
        if main:
            bar.write(f"saved {path}")
        if tc.export_checkpoints:
            export(
                accelerator,
                model,
                cfg,
                path / EXPORT_DIR,
                step=step,
                samples_seen=samples_seen,
                tracker=tracker,
            )

    while step < tc.max_steps:
        sums: dict[str, torch.Tensor] = {}
        skipped, grad_norm = 0, None
        for micro in range(tc.grad_accum):
            batch = next_batch()
            images = batch["image"].to(accelerator.device, non_blocking=True)
            images2 = batch.get("image2")
            images2 = (
                images2.to(accelerator.device, non_blocking=True) if images2 is not None else None
            )
            if augment is not None:
                images, *second = augment(images, step, micro)
                images2 = second[0] if second else None
            images, images2 = prepare_input(images, tc), prepare_input(images2, tc)
            skipped = int(batch.get("skipped", 0))
            with accelerator.accumulate(model):
                with autocast:
                    loss, terms = model(images, images2)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, tc.grad_clip or math.inf)
                optimizer.step()  # a no-op until the last micro-batch of the step
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.float() / tc.grad_accum
        step += 1
        samples_seen += tc.batch_size * tc.grad_accum * world
        window["steps"] += 1

        stopping, skipped_total, terms_mean = agree(accelerator, step, stop.raised, skipped, sums)
        probe_now = main and tc.eval_every > 0 and step % tc.eval_every == 0 and cfg.data.val_shards
        if step % tc.log_every == 0 or step == tc.max_steps or probe_now:
            elapsed = time.perf_counter() - window["t"]
            per_proc = tc.batch_size * tc.grad_accum * window["steps"] / max(elapsed, 1e-9)
            row = {
                **terms_mean,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "samples_per_s": per_proc,
                "samples_per_s_total": per_proc * world,
                "data/skipped": skipped_total,
                "samples_seen": samples_seen,
                "world_size": world,
            }
            if probe_now:
                row.update(run_probe(model, accelerator, cfg))
            if tracker:
                tracker.log(row, step)
                bar.set_postfix(bar_fields(row), refresh=False)
            window = {"t": time.perf_counter(), "steps": 0}
        bar.update(1)

        if stopping:
            save("preempted")
            accelerator.print(f"stop signal: saved at step {step}; run again to resume")
            break
        if step % tc.save_every == 0 or step == tc.max_steps:
            save("final" if step == tc.max_steps else "periodic")

    redirect.__exit__(None, None, None)
    bar.close()
    if loader is not None:
        loader.close()
    if step >= tc.max_steps:
        path = export(
            accelerator,
            model,
            cfg,
            out / EXPORT_DIR,
            step=step,
            samples_seen=samples_seen,
            tracker=tracker,
        )
        if main:
            plot(out)
        accelerator.print(f"exported the encoder to {path}")
    if tracker:
        tracker.close()
    accelerator.end_training()
    return step


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad configuration exits with code 2 and one line."""
    quiet = os.environ.get("RANK", "0") != "0"
    try:
        cfg, force_config = parse_args(argv)
        train(cfg, force_config)
    except ConfigError as err:
        if not quiet:
            print(f"pretrain.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as err:
        if not quiet:
            print(f"pretrain.py: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
