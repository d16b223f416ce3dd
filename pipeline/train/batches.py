"""The training stream as the loop reads it: endless, read with the stop signals blocked,
its first batch read before anything is written; and the stop flag those signals set."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal

from pipeline.core.schema import Config
from pipeline.data.loaders import train_loader

__all__ = ["StopFlag", "TrainBatches", "open_batches"]


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM preemption) and by a first Ctrl-C (SIGINT); acted
    on at the next step boundary, where the run saves and ends.

    A second Ctrl-C raises KeyboardInterrupt at once. What it cuts short is a folder
    built beside its final place (``checkpoints/.tmp-step_N``, ``.tmp-export``), which
    the next start removes; the finished checkpoints are untouched. As a context manager
    it puts the previous handlers back on leaving.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.raised = self.interrupted = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            _say("\nCtrl-C: saving at the end of this step; Ctrl-C again to quit unsaved\n")
        self.raised = True

    def __enter__(self) -> StopFlag:
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

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


def _say(text: str) -> None:
    """Write to stderr from a signal handler (a raw write: the handler may have cut a
    print short), on the main process only."""
    if os.environ.get("RANK", "0") == "0":
        os.write(2, text.encode())


class TrainBatches:
    """The endless training stream, read with ``next()``.

    It starts again at the end of an epoch, and is read with the stop signals blocked
    (``StopFlag.shielded_children``), since reading may start loader workers. As a
    context manager it stops the workers on leaving.
    """

    def __init__(self, loader, stop: StopFlag):
        self.loader, self.stop = loader, stop
        self.batches = iter(loader)
        self.pending: list[dict] = []

    def __next__(self) -> dict:
        if self.pending:
            return self.pending.pop()
        with self.stop.shielded_children():
            try:
                return next(self.batches)
            except StopIteration:  # the end of an epoch: start the stream again
                self.batches = iter(self.loader)
                return next(self.batches)

    def read_first(self) -> None:
        """Read the first batch now (it is the first one ``next()`` returns)."""
        self.pending.append(next(self))

    def __enter__(self) -> TrainBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.loader.close()


def open_batches(accelerator, cfg: Config, state, stop: StopFlag) -> TrainBatches:
    """This rank's training stream, with its first batch already read: unusable data
    stops the run here, before anything is written."""
    # A resampled stream cannot be rewound; reseeding with seed + step gives a resumed
    # run fresh, reproducible data instead of replaying the first batches.
    loader = train_loader(
        cfg.data,
        batch_size=cfg.train.batch_size,
        img_size=cfg.model.img_size,
        in_chans=cfg.model.in_chans,
        seed=cfg.train.seed + state.step,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    atexit.register(loader.close)  # also on an exception: no worker left to wait for
    batches = TrainBatches(loader, stop)
    batches.read_first()
    return batches
