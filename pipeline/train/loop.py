"""The pretraining loop behind ``pretrain.py`` (the command line is ``pipeline.pretrain``).

One Accelerator drives plain DDP (CPU gloo or GPU NCCL) and DeepSpeed ZeRO 1/2 alike;
the launch form comes from the accelerate config file (see ``launch/``). Each rank reads
its own data stream (the loader is never passed through ``accelerator.prepare``).

A "step" is one optimizer step (``train.grad_accum`` micro-batches). Once per step the
ranks all-reduce one small vector: the stop flag (SIGTERM, SIGUSR1, Ctrl-C), the loss terms
and the skipped-sample count, so every rank agrees on when to stop, a NaN anywhere stops
all of them with the step and the term named, and the log holds cross-rank means.

This module holds the outline of a run (``train``) with its set-up, resume, saving and
finishing; the step and the cross-rank vote are in ``pipeline.train.step``, logging and the
progress bar in ``pipeline.train.progress``.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from pipeline.core.errors import ConfigError, state_dict_mismatch
from pipeline.core.files import CONFIG_FILE, METRICS, PLOT
from pipeline.core.schema import Config, save_config
from pipeline.data.write import prepare_digits
from pipeline.models.speed import apply_speed_options, keep_freed_memory, resolve_precision
from pipeline.objective.model import build_model
from pipeline.share.card import render_card
from pipeline.share.export import EXPORT_CONFIG, EXPORT_DIR, export_encoder, remove_partial_export
from pipeline.share.plots import plot_metrics
from pipeline.train.batches import StopFlag, open_batches
from pipeline.train.budget import TimeBudget
from pipeline.train.checkpoint import clean_partial_checkpoints, load_checkpoint, save_checkpoint
from pipeline.train.lock import one_writer
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.train.preflight import preflight
from pipeline.train.progress import (
    Progress,
    log_due,
    log_row,
    open_tracker,
    probe_due,
    probe_if_due,
)
from pipeline.train.run_folder import inspect_run
from pipeline.train.step import (
    TrainStep,
    Vote,
    agree,
    autocast_inside_deepspeed,
    raise_if_nonfinite,
    recast_batchnorm_for_deepspeed,
)
from pipeline.train.threads import use_threads

__all__ = ["train"]

# ------------------------------------------------------------------ the outline


def train(cfg: Config, force_config: bool = False) -> int:
    """Train (resuming if a checkpoint exists); returns the last step reached.

    Nothing is written into ``train.output_dir`` until the whole input has been checked:
    the config, the folder, the shards, the backbone, the folder's saved config and the
    first batch of data; only the folder's lock (``pipeline.train.lock``) comes first, and
    goes again on any refusal. A run that is complete says so and returns. With
    ``train.max_minutes`` the run's length is re-planned at every logged row
    (``pipeline.train.budget``).
    """
    started = time.monotonic()  # a time budget counts from here
    preflight(cfg)  # before any set-up: a wrong path is reported in a blink
    keep_freed_memory(cfg.train.keep_freed_memory)  # before the loader workers fork
    threads = use_threads(cfg)  # intra-op threads from the cores this process may use
    tc, accelerator = cfg.train, make_accelerator(cfg)
    accelerator.print(threads.line())
    if not cfg.data.train_shards:
        use_default_data(accelerator, cfg)
    # The lock before the folder is read or written; signals stop at a step boundary.
    with one_writer(accelerator, tc.output_dir), StopFlag() as stop:
        state = inspect_output_dir(accelerator, cfg, force_config)
        budget = TimeBudget.of_run(tc.max_minutes, tc.max_steps, state.meta)
        if budget:
            accelerator.print(budget.line(state.train_seconds))
        length = budget.planned if budget else tc.max_steps  # a resume keeps its plan
        if state.complete(length) and state.exported:
            return end_complete_run(accelerator, cfg, state)
        # Trained, but killed before the export: only the export is left to do.
        finishing = state.complete(length)
        batches = nullcontext() if finishing else open_batches(accelerator, cfg, state, stop)
        prepare_output_dir(accelerator, cfg)
        model = build_seeded_model(cfg)
        report_receptive_field(accelerator, model.encoder, cfg)
        model, optimizer, scheduler = prepare_training(accelerator, model, tc)
        recast_batchnorm_for_deepspeed(accelerator, model)
        autocast_inside_deepspeed(accelerator, model)
        restore_or_seed(accelerator, cfg, state)
        save_run_config(accelerator, cfg)  # after the restore: a misfit never replaces it
        train_step = TrainStep(accelerator, cfg, model, optimizer, scheduler)
        tracker = open_tracker(accelerator, cfg, state.step)  # also when only the export is left
        tc.max_steps = length  # from here on, the run's length (config.yaml keeps the cap)
        progress = Progress(accelerator, tc, state, hidden=finishing, started=started)
        with batches, progress:
            while progress.step < tc.max_steps:
                result = train_step(batches, progress.step)
                progress.advance()
                seconds = progress.train_seconds()
                vote = agree(accelerator, stop.raised, result.skipped, result.sums, seconds)
                raise_if_nonfinite(vote.means, progress.step)
                if budget and log_due(tc, progress.step):
                    tc.max_steps = budget.replan(progress.step, vote.seconds)
                    progress.bar.total = tc.max_steps
                if log_due(tc, progress.step) or probe_due(accelerator, cfg, progress.step):
                    row = log_row(vote, result.lr, result.grad_norm, progress)
                    row |= budget.row(vote.seconds) if budget else {}
                    row |= probe_if_due(accelerator, model, cfg, progress.step)
                    progress.log(row, tracker)
                progress.bar.update(1)
                if vote.stopping or save_due(tc, progress.step):
                    tag = checkpoint_tag(vote, progress, tc)
                    save(accelerator, model, cfg, progress, tracker, tag)
                if vote.stopping:
                    break
        return finish(accelerator, model, cfg, progress, tracker)


# ------------------------------------------------------------------ set-up


def make_accelerator(cfg: Config):

    no_gpu = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Without a GPU: cpu=True gives plain DDP on CPU, but it would switch DeepSpeed off,
    # and both need gloo named explicitly, or every rank believes it is rank 0 of 1.
    cpu = no_gpu and not deepspeed
    handlers = [InitProcessGroupKwargs(backend="gloo")] if no_gpu and launched else []
    precision, said = resolve_precision(cfg.train.mixed_precision, cuda=not no_gpu)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    accelerator.print(said)
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


def use_default_data(accelerator, cfg: Config) -> None:
    """The embedded default data: digits written as shards on first use (main first).

    Goes to ``$DIM_DEFAULT_DATA`` (default ``data/digits``); fills ``data.train_shards``
    and, when empty, ``data.val_shards`` (for the online probe).
    """

    folder = Path(os.environ.get("DIM_DEFAULT_DATA", "data/digits"))
    with accelerator.main_process_first():
        train_manifest = prepare_digits(folder)
    cfg.data.train_shards = str(train_manifest)
    val_manifest = train_manifest.parent / "val.json"
    if not cfg.data.val_shards and val_manifest.is_file():
        cfg.data.val_shards = str(val_manifest)


def inspect_output_dir(accelerator, cfg: Config, force_config: bool):
    """What ``train.output_dir`` already holds (``run_folder.RunState``), read-only; a
    folder of another configuration is refused unless forced, and forcing is announced."""

    out = Path(cfg.train.output_dir)
    state = inspect_run(
        out,
        cfg.to_dict(),
        Config().to_dict(),
        force=force_config,
        export_marker=f"{EXPORT_DIR}/{EXPORT_CONFIG}",
    )
    if state.changed:
        accelerator.print(f"--force-config: continuing {out} with {'; '.join(state.changed)}")
    return state


def end_complete_run(accelerator, cfg: Config, state) -> int:
    """A run already trained to ``train.max_steps`` and exported: say so, end, return its step."""
    tc = cfg.train
    if tc.max_minutes:
        length = f"the steps its {tc.max_minutes:g}-minute budget planned"
        further = "a budgeted run keeps its plan: train longer in another train.output_dir"
    else:
        length = f"train.max_steps={tc.max_steps}"
        further = "raise train.max_steps to train further"
    accelerator.print(
        f"{Path(tc.output_dir)} is complete: trained to step {state.step} ({length}) and "
        f"exported; {further}"
    )
    accelerator.end_training()
    return state.step


def prepare_output_dir(accelerator, cfg: Config) -> None:
    """Collective: the main process creates ``train.output_dir`` and removes what a killed
    run left half-written (a checkpoint, an export)."""

    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        clean_partial_checkpoints(out)
        remove_partial_export(out / EXPORT_DIR)
    accelerator.wait_for_everyone()


def build_seeded_model(cfg: Config):
    """The DIM model from ``train.seed`` (identical initial weights on every rank), laid
    out for speed (``speed.apply_speed_options``: channels_last, compile)."""

    set_seed(cfg.train.seed)
    return apply_speed_options(build_model(cfg), cfg.train)


def report_receptive_field(accelerator, encoder, cfg: Config) -> None:
    """Log what one local-map location sees; warn when it sees the whole image, where
    local MI degenerates into telling whole images apart. Main process only: every rank
    holds the same architecture."""

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


def prepare_training(accelerator, model, tc):
    """(model, optimizer, scheduler), built from ``train.*`` and wrapped by accelerate
    (DDP or the DeepSpeed engine)."""

    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)
    return accelerator.prepare(model, optimizer, scheduler)


# ------------------------------------------------------------------ resume


def load_run(accelerator, ckpt: Path) -> dict:
    """Restore a checkpoint; one line when it does not fit the configured model."""

    try:
        return load_checkpoint(accelerator, ckpt)  # restores RNG states as well
    except RuntimeError as err:  # e.g. "size mismatch for ...", "Missing key(s) ..."
        raise ConfigError(
            f"checkpoint {ckpt} does not fit the configured model "
            f"({state_dict_mismatch(err)}); "
            f"start a new run with another train.output_dir"
        ) from None


def restore_or_seed(accelerator, cfg: Config, state) -> None:
    """Where the random state starts: the latest checkpoint (weights, optimizer, RNG
    states) when the folder has one, else ``train.seed`` made per-rank, so that noise,
    augmentations and negatives differ between ranks."""

    if state.checkpoint is not None:
        load_run(accelerator, state.checkpoint)
        accelerator.print(f"resumed from {state.checkpoint} at step {state.step}")
    else:
        set_seed(cfg.train.seed, device_specific=True)


def save_run_config(accelerator, cfg: Config) -> None:
    """The main process writes the resolved config into ``train.output_dir``."""

    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.train.output_dir) / CONFIG_FILE)


# ------------------------------------------------------------------ saving


def save_due(tc, step: int) -> bool:
    return step % tc.save_every == 0 or step == tc.max_steps


def checkpoint_tag(vote: Vote, progress: Progress, tc) -> str:
    """Why this checkpoint is written: ``preempted``, ``final`` or ``periodic``."""
    if vote.stopping:
        return "preempted"
    return "final" if progress.step == tc.max_steps else "periodic"


def save(accelerator, model, cfg: Config, progress: Progress, tracker, tag: str) -> None:
    """Collective: a checkpoint of this step, and with ``train.export_checkpoints`` an
    export beside it."""

    meta = {
        "samples_seen": progress.samples_seen,
        "world_size": accelerator.num_processes,
        "tag": tag,
        "wandb_id": tracker.run_id if tracker else None,
        "train_seconds": progress.train_seconds(),
    }
    if cfg.train.max_minutes:  # the plan a resume keeps (pipeline.train.budget)
        meta["planned_steps"] = cfg.train.max_steps
    out = Path(cfg.train.output_dir)
    path = save_checkpoint(accelerator, out, progress.step, meta, cfg.train.keep_last)
    if accelerator.is_main_process:
        progress.bar.write(f"saved {path}")
    if cfg.train.export_checkpoints:
        export(
            accelerator,
            model,
            cfg,
            path / EXPORT_DIR,
            step=progress.step,
            samples_seen=progress.samples_seen,
            tracker=tracker,
        )


def export(
    accelerator, model, cfg: Config, folder: Path, *, step: int, samples_seen: int, tracker=None
) -> Path:
    """Collective: the main process writes the model folder (pipeline.export) with its
    card, and logs it to W&B as a model artifact of this run. Returns the folder."""

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
            precision=accelerator.mixed_precision,
        )
        export_encoder(encoder, folder, dataclasses.asdict(cfg.model), card=card)
        if tracker:
            tracker.log_model(folder, step=step, final=step >= cfg.train.max_steps)
    accelerator.wait_for_everyone()
    return folder


# ------------------------------------------------------------------ finishing


def plot(output_dir: Path) -> None:
    """metrics.png from the run's metrics.jsonl."""

    plot_metrics(output_dir / METRICS, output_dir / PLOT)


def finish(accelerator, model, cfg: Config, progress: Progress, tracker) -> int:
    """The end of a run: the final export and plots when ``train.max_steps`` is reached,
    else (a stop signal) how to resume; then the tracker and the accelerator are closed.
    Returns the step reached."""

    out, step = Path(cfg.train.output_dir), progress.step
    trained = progress.train_seconds()  # what the budget counts: the export is not in it
    if step >= cfg.train.max_steps:
        path = export(
            accelerator,
            model,
            cfg,
            out / EXPORT_DIR,
            step=step,
            samples_seen=progress.samples_seen,
            tracker=tracker,
        )
        if accelerator.is_main_process:
            plot(out)
        if cfg.train.max_minutes:
            accelerator.print(
                f"time budget {cfg.train.max_minutes:g} min: {step:,} steps in "
                f"{trained / 60:.1f} min"
            )
        accelerator.print(f"exported the encoder to {path}")
    else:
        accelerator.print(f"stop signal: saved at step {step}; run again to resume")
    if tracker:
        tracker.close()
    accelerator.end_training()
    return step
