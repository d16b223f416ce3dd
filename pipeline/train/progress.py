"""Logging during training: where the run is, its throughput, the rows it logs (and the
online probe in them), the progress bar, and the tracker they go to."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.core.schema import Config
from pipeline.eval.online import online_probe
from pipeline.share.tracking import ONLINE_PROBE, Tracker
from pipeline.train.step import Vote

__all__ = [
    "Progress",
    "bar_fields",
    "log_due",
    "log_row",
    "open_tracker",
    "probe_due",
    "probe_if_due",
    "probe_line",
]


def open_tracker(accelerator, cfg: Config, step: int):
    """metrics.jsonl and W&B (``tracking.Tracker``) on the main process, None elsewhere."""

    if not accelerator.is_main_process:
        return None
    return Tracker(Path(cfg.train.output_dir), cfg.wandb, cfg.to_dict(), resume_step=step)


class Progress:
    """Where the run is (step, samples seen, seconds since ``started``, a
    ``time.monotonic()``), its throughput since the last logged row, and the progress bar
    (main process). As a context manager, warnings print above the bar rather than
    through it, and the bar closes on leaving."""

    def __init__(self, accelerator, tc, state, *, hidden: bool, started: float):

        self.step, self.samples_seen = state.step, state.samples_seen
        self.started = started
        self.seconds_before = state.train_seconds  # earlier processes of the run
        self.world = accelerator.num_processes
        self.per_step = tc.batch_size * tc.grad_accum  # samples per process
        self.bar = tqdm(
            total=tc.max_steps,
            initial=state.step,
            disable=not accelerator.is_main_process or hidden,
            dynamic_ncols=True,
            unit="step",
        )
        self.redirect = logging_redirect_tqdm()
        self.since, self.steps = time.perf_counter(), 0
        self.probe: dict[str, float] = {}  # the online probe's latest accuracies

    def __enter__(self) -> Progress:
        self.redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.redirect.__exit__(*exc)
        self.bar.close()

    def advance(self) -> None:
        """One optimizer step done."""
        self.step += 1
        self.samples_seen += self.per_step * self.world
        self.steps += 1

    def seconds(self) -> float:
        """Seconds this process has run."""
        return time.monotonic() - self.started

    def train_seconds(self) -> float:
        """Seconds the run has taken, over all its processes (resumes)."""
        return self.seconds_before + self.seconds()

    def samples_per_s(self) -> float:
        """Samples per second of this process since the last logged row."""
        return self.per_step * self.steps / max(time.perf_counter() - self.since, 1e-9)

    def log(self, row: dict, tracker) -> None:
        """The row to the tracker and the bar (main process), and a line when it holds
        the online probe's accuracies, which the bar then keeps showing; the throughput
        window starts again."""
        if tracker:
            tracker.log(row, self.step)
            probe = {k: v for k, v in row.items() if k.startswith(ONLINE_PROBE)}
            if probe:
                self.probe = probe
                self.bar.write(probe_line(self.step, probe))
            self.bar.set_postfix(bar_fields(row | self.probe), refresh=False)
        self.since, self.steps = time.perf_counter(), 0


def log_due(tc, step: int) -> bool:
    return step % tc.log_every == 0 or step == tc.max_steps


def probe_due(accelerator, cfg: Config, step: int) -> bool:
    """The online probe runs every ``train.eval_every`` steps, on the main process, when
    there is labelled validation data."""
    every = cfg.train.eval_every
    return bool(
        accelerator.is_main_process and every > 0 and step % every == 0 and cfg.data.val_shards
    )


def log_row(vote: Vote, lr: float, grad_norm, progress: Progress) -> dict:
    """One metrics.jsonl / W&B row: the mean terms, the rate, throughput and counts."""
    per_proc = progress.samples_per_s()
    return {
        **vote.means,
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "samples_per_s": per_proc,
        "samples_per_s_total": per_proc * progress.world,
        "data/skipped": vote.skipped,
        "samples_seen": progress.samples_seen,
        "world_size": progress.world,
    }


def bar_fields(row: dict) -> dict[str, str]:
    """What the progress bar shows: loss, images/s over all ranks, the MI estimates and
    the probe's accuracies."""
    fields = {"loss": f"{row['loss']:.3f}", "img/s": f"{row['samples_per_s_total']:.0f}"}
    for prefix in ("mi/", ONLINE_PROBE):
        fields.update(
            {k.removeprefix(prefix): f"{v:.3f}" for k, v in row.items() if k.startswith(prefix)}
        )
    return fields


def probe_line(step: int, probe: dict[str, float]) -> str:
    """``step N: online probe knn 91.2%, linear 93.4%``."""
    scores = ", ".join(f"{k.removeprefix(ONLINE_PROBE)} {v:.1%}" for k, v in sorted(probe.items()))
    return f"step {step}: online probe {scores}"


def probe_if_due(accelerator, model, cfg: Config, step: int) -> dict[str, float]:
    """The online probe's accuracies (pipeline.eval.online) when ``probe_due``, else nothing.
    Its feature extraction puts the encoder in eval mode and back (``features.eval_mode``)."""
    if not probe_due(accelerator, cfg, step):
        return {}

    return online_probe(accelerator.unwrap_model(model).encoder, cfg, accelerator.device)
