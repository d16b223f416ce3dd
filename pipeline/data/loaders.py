"""WebDataset streams: an endless resampled training stream and an exactly-once eval stream.

Every rank reads its own stream, so the train loop must NOT route these loaders through
rank 0. With accelerate:

- call ``train_loader(cfg.data, ..., rank=accelerator.process_index,
  world_size=accelerator.num_processes)`` on every process and move batches yourself
  (``batch["image"].to(accelerator.device)``);
- do not pass the loaders to ``accelerator.prepare``. They are not ``DataLoader``
  objects, so ``prepare`` would hand them back untouched; but if you wrap the inner
  ``.loader`` instead, accelerate's default for iterable datasets
  (``dispatch_batches=True``) reads every batch on rank 0 and scatters it. If a
  prepared loader is ever unavoidable, build the Accelerator with
  ``dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False)``.

Training: shards are drawn with replacement (``ResampledShards``), so no rank ever runs
out of data and uneven shard counts across ranks cannot hang a run; an epoch is a fixed
number of batches per rank (``data.epoch_samples`` or the manifest's size), split over
the workers. Streams are seeded from ``(seed, rank, worker, epoch)`` only (never time or
pid), so they differ per rank and worker and repeat exactly for the same seed.

Bad data: a shard that cannot be read (truncated tar, missing URL) or an image that does
not decode is skipped; the batches carry ``skipped``, the total this process has skipped
so far (summed over its workers). A truncated shard counts the samples it lost when a
manifest gives its size, else 1. Each stream warns about its first ``WARN_IN_FULL`` bad
samples or shards in full, then logs counts per shard at the end of each epoch. Warnings
travel with the batches and are logged by the process that iterates the loader (so a
progress bar there can print them cleanly). A stream that sees ``data.max_bad_streak``
bad samples or shards in a row stops with one ``ConfigError`` naming the shards and the
most common reason.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import multiprocessing
import random
import signal
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander
from webdataset.utils import make_seed

from pipeline.core.errors import ConfigError
from pipeline.core.schema import DataConfig
from pipeline.data.augment import AUGMENTS, FixedSize, Views, build_views, eval_views
from pipeline.data.batch_augment import on_batch
from pipeline.data.decode import JPEG_EXTS, decode_on_device, jpeg_size, read_image
from pipeline.data.shards import dataset_size, resolve_shards, resolve_spec

__all__ = [
    "IMAGE_EXTS",
    "StreamLoader",
    "batch_views",
    "dataset_size",
    "eval_loader",
    "resolve_shards",
    "train_loader",
]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_BAD_STREAK = 1000  # bad shards/samples in a row before a stream gives up
WARN_IN_FULL = 3  # warnings per stream in full; after that, counts per shard
NOMINAL_EPOCH = 10_000  # samples per epoch when neither config nor manifest says
_LOST = "__lost__"  # key of the marker a failed or short shard leaves in the stream


def _view_keys(count: int) -> list[str]:
    """Where a row or batch holds its views: ``image``, then ``image2`` ... ``imageN``."""
    return ["image", *(f"image{n}" for n in range(2, count + 1))]


def batch_views(batch: dict) -> list:
    """The views a loader batch holds, in order (``image``, ``image2``, ...)."""
    count = 1
    while f"image{count + 1}" in batch:
        count += 1
    return [batch[key] for key in _view_keys(count)]


class _StreamState:
    """What one copy of a stream (one rank, one worker) knows: who it is, its epoch, its
    seeds, and how much bad data it skipped. Shared by the stages of one pipeline."""

    def __init__(self, seed: int, rank: int, world_size: int, max_bad_streak: int = MAX_BAD_STREAK):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.worker, self.num_workers, self.epoch = 0, 1, -1
        self.skipped = self.bad_streak = self.warned = 0
        self.max_bad_streak = max_bad_streak
        self.messages: list[str] = []  # warnings not yet handed to the loader
        self.counted: Counter[str] = Counter()  # shard -> bad reads since the last report
        self.streak_shards: Counter[str] = Counter()
        self.streak_reasons: Counter[str] = Counter()
        self.torch_state = torch.get_rng_state()

    def begin(self) -> None:
        """Start an epoch in this process: find the worker id, reseed, zero the counts."""
        info = get_worker_info()
        self.worker, self.num_workers = (info.id, info.num_workers) if info else (0, 1)
        self.epoch += 1
        self.skipped = self.bad_streak = 0
        self.torch_state = torch.Generator().manual_seed(self.derive(0)).get_state()

    def derive(self, purpose: int) -> int:
        return make_seed(self.seed, self.rank, self.worker, self.epoch, purpose)

    def shard_seed(self) -> int:
        return self.derive(1)

    @property
    def slot(self) -> tuple[int, int]:
        """(this stream's index, number of streams) over ranks x workers."""
        return self.rank * self.num_workers + self.worker, self.world_size * self.num_workers

    def bad(self, count: int, url: str, reason: str, sample: str | None = None) -> None:
        """Count a bad sample (or a shard's lost samples); warn in full the first few times."""
        self.skipped += count
        self.bad_streak += 1
        self.streak_shards[url] += 1
        self.streak_reasons[reason] += 1
        if self.warned < WARN_IN_FULL:
            self.warned += 1
            where = f"sample {sample!r} of shard {url}" if sample is not None else f"shard {url}"
            last = "; further bad data is counted per shard" if self.warned == WARN_IN_FULL else ""
            self.messages.append(
                f"skipped {count} sample(s), {where}: {reason} [rank {self.rank} "
                f"worker {self.worker}]{last}"
            )
        else:
            self.counted[url] += 1
        if self.bad_streak >= self.max_bad_streak:
            raise _Unusable(self.unusable())

    def unusable(self) -> str:
        """The one line that stops a stream: how many in a row, which shards, why."""
        reason, times = self.streak_reasons.most_common(1)[0]
        shards = sorted(self.streak_shards)
        shown = ", ".join(shards[:5]) + (f" and {len(shards) - 5} more" if len(shards) > 5 else "")
        return (
            f"the data is unusable: {self.bad_streak} bad samples or shards in a row "
            f"(data.max_bad_streak={self.max_bad_streak}) from {len(shards)} shard(s): "
            f"{shown}; most common reason ({times} of {self.bad_streak}): {reason}"
        )

    def report(self) -> None:
        """Queue one line of per-shard counts for what was not warned about in full."""
        if self.counted:
            counts = ", ".join(f"{url}: {n}" for url, n in sorted(self.counted.items()))
            self.messages.append(
                f"bad samples or shards skipped since the last report "
                f"[rank {self.rank} worker {self.worker}]: {counts}"
            )
            self.counted.clear()

    def take_messages(self) -> list[str]:
        messages, self.messages = self.messages, []
        return messages

    def good(self) -> None:
        if self.bad_streak:
            self.bad_streak = 0
            self.streak_shards.clear()
            self.streak_reasons.clear()


class _Unusable(Exception):
    """Raised inside a stream; the loader turns it into one ConfigError line."""


def _read_shards(sources: Iterable[dict], *, sizes: dict[str, int]) -> Iterator[dict]:
    """Shard urls -> raw samples. A shard that fails, comes up short or is empty leaves
    one marker saying how many samples it lost; the decode stage counts it."""
    for source in sources:
        url, got, error = source["url"], 0, None
        try:
            with contextlib.closing(wds.gopen(url)) as stream:
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                    got += 1
                    yield sample
        except Exception as exn:  # truncated tar, unreachable URL, failing pipe, ...
            error = exn
        expected = sizes.get(url)
        lost = max(expected - got, 0) if expected is not None else int(error is not None)
        if error is not None or lost or not got:
            what = (
                f"read error after {got} samples: {_short(error)}"
                if error
                else "no samples in it"
                if expected is None
                else f"{got} samples read, the manifest says {expected}"
            )
            yield {_LOST: lost, "__url__": url, "__reason__": what}


def _short(exn: BaseException | None) -> str:
    # tar readers append " @ <file object>" to messages; the warning names the shard already
    text = str(exn.args[0] if exn and exn.args else exn).split(" @ <")[0].split()
    return f"{type(exn).__name__}: {' '.join(text)}"


def _every(items: Iterable[Any], *, part: int, parts: int) -> Iterator[Any]:
    """Items ``part, part + parts, ...``: webdataset's split_by_node reads the rank from
    torch.distributed or the environment; here the caller passes it."""
    return islice(items, part, None, parts)


def _every_slot(items: Iterable[Any], *, state: _StreamState) -> Iterator[Any]:
    part, parts = state.slot
    return islice(items, part, None, parts)


def _shuffle(samples: Iterator[dict], *, state: _StreamState, size: int) -> Iterator[dict]:
    """webdataset's shuffle buffer with an rng from the stream's seed (not the clock).
    The buffer holds undecoded bytes, so filling it completely at start is cheap."""
    if size < 2:
        return samples
    return wds.shuffle(size, initial=size, rng=random.Random(state.derive(2)))(samples)


def read_label(sample: dict, label_key: str) -> int:
    """The integer label of a raw sample, -1 when it has none."""
    if label_key == "none":
        return -1
    if label_key in ("auto", "cls") and "cls" in sample:
        return int(sample["cls"])
    if label_key == "cls" or "json" not in sample:
        return -1
    value: Any = json.loads(sample["json"])
    for part in (label_key[5:] if label_key.startswith("json:") else "label").split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return -1 if value is None else int(value)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Small images run faster on one thread; more only contend (10-30x slower hue
    jitter on 2 busy cores). Workers already have one; this covers num_workers=0."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


@contextlib.contextmanager
def _own_rng(state: _StreamState, active: bool) -> Iterator[None]:
    """Draw augmentations from the stream's torch rng state: reproducible per stream, and
    the trainer's global rng is left untouched when reading in the main process."""
    if not active:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state.torch_state)
        yield
        state.torch_state = torch.get_rng_state()


@functools.cache
def _say_once(message: str) -> None:
    log.warning(message)


def eight_bit(image: torch.Tensor) -> torch.Tensor:
    """8 bits per channel, what augmentation and batching expect: 16-bit PNGs decode as
    uint16 and are scaled down (65535 -> 255), said once per process. Every other mode
    PIL writes into a shard (palette, gray + alpha, CMYK JPEG, ...) decodes to 8 bits."""
    if image.dtype == torch.uint8:
        return image
    _say_once(f"{image.dtype} images (16-bit PNG) are scaled to 8 bits per channel")
    return (image.to(torch.int32) // 257).to(torch.uint8)


def _decode(
    samples: Iterable[dict],
    *,
    state: _StreamState,
    views: Views,
    in_chans: int,
    label_key: str,
    random_views: bool,
    with_keys: bool,
    draft: bool = True,
    ship_jpeg: bool = False,
) -> Iterator[dict]:
    """Raw samples -> {"image"[, "image2", ...], "label"[, "key"]}; bad ones are counted,
    not raised.
    Grayscale output is decoded as such (exact for gray sources; webp can only give RGB).
    ``draft``: large JPEGs decode at reduced scale where ``views`` allow it
    (``pipeline.data.decode``). ``ship_jpeg``: a JPEG whose header reads is passed on
    undecoded as its raw bytes (1-D uint8), for ``decode_on_device``."""
    reduction = views.reduction if draft else None
    for sample in samples:
        if _LOST in sample:
            state.bad(sample[_LOST], sample["__url__"], sample["__reason__"])
            continue
        try:
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                raise ValueError(f"no image (.{', .'.join(IMAGE_EXTS)}); keys {sorted(sample)}")
            row: dict[str, Any] = {"label": read_label(sample, label_key)}
            data = sample[ext]
            if ship_jpeg and ext in JPEG_EXTS and jpeg_size(data) is not None:
                images = [torch.frombuffer(bytearray(data), dtype=torch.uint8)]
            else:
                with _one_thread(), _own_rng(state, random_views):
                    image = read_image(data, ext, in_chans=in_chans, reduction=reduction)
                    if isinstance(image, torch.Tensor):
                        image = eight_bit(image)
                    images = views(image)
        except Exception as exn:
            state.bad(1, sample.get("__url__", "?"), _short(exn), sample=sample.get("__key__"))
            continue
        state.good()
        row.update(zip(_view_keys(len(images)), images, strict=True))
        if with_keys:
            row["key"] = sample["__key__"]
        yield row


def _collate_shipped(rows: list[dict]) -> dict:
    """A batch whose images stay a list: raw JPEG bytes of any length beside decoded squares."""
    batch = default_collate([{k: v for k, v in row.items() if k != "image"} for row in rows])
    batch["image"] = [row["image"] for row in rows]
    return batch


class _DecodeOnDevice:
    """Run in the process that iterates the loader: a shipped batch's JPEGs decoded on
    ``device`` and fitted to the square (``decode_on_device``); returns the images that
    failed, which the loader counts as skipped."""

    def __init__(self, device: torch.device, fit: FixedSize, in_chans: int):
        self.device, self.fit, self.in_chans = device, fit, in_chans

    def __call__(self, batch: dict) -> int:
        batch["image"], bad = decode_on_device(
            batch["image"], self.device, in_chans=self.in_chans, fit=self.fit
        )
        if bad:
            log.warning(
                "%d image(s) of a batch did not decode on %s; replaced by gray", bad, self.device
            )
        return bad


def decode_device(cfg: DataConfig) -> torch.device | None:
    """Where JPEGs are decoded: the CUDA device this process uses with
    ``data.decode_on=device`` (and batched augmentation), else None (the loader workers).
    Said in one line when the request cannot be met."""
    if cfg.decode_on != "device":
        return None
    if not on_batch(cfg):
        log.warning(
            "data.decode_on=device needs the batched augmentation (data.augment_on=batch "
            "and an augmentation other than none); decoding on the CPU in the loader workers"
        )
        return None
    if not torch.cuda.is_available():
        log.warning(
            "data.decode_on=device: no CUDA device here; decoding on the CPU in the loader "
            "workers instead"
        )
        return None
    device = torch.device("cuda", torch.cuda.current_device())
    log.info("data.decode_on=device: JPEGs are decoded in batches on %s (nvJPEG)", device)
    return device


class _Stream(IterableDataset):
    """One process's (or worker's) batches, each tagged with its running skip count; a
    last count-only record reports skips that came after the last batch."""

    def __init__(self, pipeline: wds.DataPipeline, state: _StreamState, batches: int | None):
        super().__init__()
        self.pipeline, self.state, self.batches = pipeline, state, batches

    def __iter__(self) -> Iterator[dict]:
        state = self.state
        state.begin()
        if self.batches is None:
            batches: Iterable[dict] = self.pipeline
        else:  # this worker's share of the rank's epoch
            share = self.batches // state.num_workers + (
                state.worker < self.batches % state.num_workers
            )
            batches = self.pipeline.with_epoch(share) if share else []
        try:
            for batch in batches:
                batch.update(
                    _skipped=state.skipped, _worker=state.worker, _log=state.take_messages()
                )
                yield batch
        except _Unusable as err:  # raised here it would reach the user as a worker traceback
            yield {
                "_skipped": state.skipped,
                "_worker": state.worker,
                "_final": True,
                "_log": state.take_messages(),
                "_error": str(err),
            }
            return
        state.report()
        yield {
            "_skipped": state.skipped,
            "_worker": state.worker,
            "_final": True,
            "_log": state.take_messages(),
        }


@contextlib.contextmanager
def _sigchld_default():
    """SIGCHLD's default action for the block (main thread only; elsewhere nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        if previous is not None:  # None: set outside Python, cannot be put back
            signal.signal(signal.SIGCHLD, previous)


class StreamLoader:
    """Iterates a ``DataLoader`` over the stream and sums the workers' skip counts.

    ``skipped`` is this process's total of skipped samples (cumulative over epochs for
    training, per pass for evaluation). ``epochs=None`` iterates forever.
    """

    def __init__(
        self,
        stream: _Stream,
        *,
        num_workers: int,
        epochs: int | None,
        batches_per_epoch: int | None = None,
        num_samples: int | None = None,
        finish: Callable[[dict], int] | None = None,
    ):
        self.loader: DataLoader | None = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0 and epochs != 1,
            pin_memory=torch.cuda.is_available(),
        )
        self.epochs, self.skipped = epochs, 0
        self.batches_per_epoch, self.num_samples = batches_per_epoch, num_samples
        self.finish = finish  # completes a batch in this process; returns samples lost
        self._passes: weakref.WeakSet = weakref.WeakSet()  # iterations in progress
        self._workers: set[multiprocessing.process.BaseProcess] = set()

    def close(self) -> None:
        """Stop the loader's worker processes now, with SIGKILL if they linger.

        The train loop starts workers with the stop signals blocked (so a job-wide
        SIGTERM cannot kill them before the main process saves); such a worker also
        ignores the SIGTERM that DataLoader and multiprocessing send at shutdown, and
        the interpreter would wait for it forever at exit. DataLoader stops its workers
        when its iterator is garbage collected; with persistent workers the DataLoader
        holds that iterator, so closing ends every pass in progress and drops the
        DataLoader. A worker still alive after that is killed, with DataLoader's SIGCHLD
        handler set aside meanwhile: where something still holds the iterator (a traceback's
        frames), its workers are still registered there and the kill would be reported as
        a worker failure. The loader is spent.
        """
        for batches in list(self._passes):
            batches.close()
        self.loader = None  # the last reference to the DataLoader and its iterator
        with _sigchld_default():  # a worker killed here has not failed
            for worker in self._workers:
                if worker.is_alive():
                    worker.kill()
                worker.join(timeout=5)
        self._workers.clear()

    def __iter__(self) -> Iterator[dict]:
        if self.loader is None:
            raise RuntimeError("StreamLoader is closed")
        batches = self._batches(self.loader)
        self._passes.add(batches)
        return batches

    def _epoch(self, loader: DataLoader) -> Iterator[dict]:
        """One pass of the DataLoader, noting the worker processes it starts."""
        before = set(multiprocessing.active_children())
        items = iter(loader)
        self._workers |= set(multiprocessing.active_children()) - before
        return items

    def _batches(self, loader: DataLoader) -> Iterator[dict]:
        if self.epochs == 1:
            self.skipped = 0
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            base, latest, yielded = self.skipped, {}, 0
            for item in self._epoch(loader):
                for message in item.pop("_log", ()):
                    log.warning(message)
                if "_error" in item:
                    raise ConfigError(item["_error"])
                latest[item.pop("_worker")] = item.pop("_skipped")
                self.skipped = base + sum(latest.values())
                if not item.pop("_final", False):
                    if self.finish is not None and (lost := self.finish(item)):
                        base += lost
                        self.skipped += lost
                    item["skipped"] = self.skipped
                    yielded += 1
                    yield item
            if self.epochs is None and not yielded:
                raise ConfigError(
                    f"the training stream produced no batch in a whole epoch "
                    f"({self.skipped} samples skipped)"
                )
            epoch += 1


def train_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    img_size: int,
    in_chans: int,
    seed: int,
    rank: int,
    world_size: int,
    epochs: int | None = None,
    with_keys: bool = False,
) -> StreamLoader:
    """Endless (or ``epochs`` long) augmented batches for one rank; see the module doc.

    Batches: ``image`` (B, in_chans, img_size, img_size) in [-1, 1], ``label`` (B,) long
    (-1 when unlabeled), ``skipped`` (int), ``image2`` ... ``imageN`` with N views
    (``augment.view_count``), ``key`` (list of sample keys) with ``with_keys``. With
    ``augment_on="batch"`` (and an augmentation), ``image`` is uint8 and unaugmented
    (resized, centre-cropped): the caller augments it with ``pipeline.data.batch_augment``,
    which also makes the other views.
    """
    shards = resolve_spec(cfg.train_shards)
    urls = [url for url, _ in shards]
    sizes = {url: n for url, n in shards if n is not None}
    epoch_samples = cfg.epoch_samples or (sum(sizes.values()) if len(sizes) == len(urls) else 0)
    if not epoch_samples:
        log.warning(
            "size of %s unknown (no manifest): nominal epoch of %d samples; set data.epoch_samples",
            cfg.train_shards,
            NOMINAL_EPOCH,
        )
        epoch_samples = NOMINAL_EPOCH
    state = _StreamState(seed, rank, world_size, cfg.max_bad_streak)
    batched = on_batch(cfg)
    fixed = FixedSize(img_size, in_chans)
    if batched:
        views = Views(None, fit=fixed)
    else:
        views = build_views(cfg, img_size=img_size, in_chans=in_chans)
    device = decode_device(cfg)
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, worker_seed=state.shard_seed, deterministic=True),
        partial(_read_shards, sizes=sizes),
        partial(_shuffle, state=state, size=cfg.shuffle_buffer),
        partial(
            _decode,
            state=state,
            views=views,
            in_chans=in_chans,
            label_key=cfg.label_key,
            random_views=AUGMENTS[cfg.augment].random and not batched,
            with_keys=with_keys,
            draft=cfg.jpeg_draft,
            ship_jpeg=device is not None,
        ),
        wds.batched(
            batch_size,
            collation_fn=default_collate if device is None else _collate_shipped,
            partial=False,
        ),
    )
    batches = max(1, epoch_samples // (batch_size * world_size))
    return StreamLoader(
        _Stream(pipeline, state, batches),
        num_workers=cfg.num_workers,
        epochs=epochs,
        batches_per_epoch=batches,
        num_samples=epoch_samples,
        finish=None if device is None else _DecodeOnDevice(device, fixed, in_chans),
    )


def eval_loader(
    spec: str,
    *,
    batch_size: int,
    img_size: int,
    in_chans: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    label_key: str = "auto",
    with_keys: bool = False,
) -> StreamLoader:
    """Every sample of ``spec`` exactly once over ranks x workers, in a fixed order,
    resized and normalised only; the last batch may be partial.

    Shards are dealt to ranks, then workers; when there are fewer shards than
    ranks x workers, every stream reads all shards and keeps every n-th sample instead.
    Ranks may get different numbers of batches: gather results, not per-batch collectives.
    """
    shards = resolve_spec(spec)
    urls = [url for url, _ in shards]
    sizes = {url: n for url, n in shards if n is not None}
    state = _StreamState(0, rank, world_size)
    by_shard = len(urls) >= world_size * max(1, num_workers)
    stages: list[Any] = [wds.SimpleShardList(urls)]
    if by_shard:
        stages += [partial(_every, part=rank, parts=world_size), wds.split_by_worker]
    stages.append(partial(_read_shards, sizes=sizes))
    if not by_shard:
        stages.append(partial(_every_slot, state=state))
    views = eval_views(img_size, in_chans)
    stages += [
        partial(
            _decode,
            state=state,
            views=views,
            in_chans=in_chans,
            random_views=False,
            label_key=DataConfig.check_label_key(label_key),
            with_keys=with_keys,
        ),
        wds.batched(batch_size, collation_fn=default_collate, partial=True),
    ]
    total = sum(sizes.values()) if len(sizes) == len(urls) else None
    return StreamLoader(
        _Stream(wds.DataPipeline(*stages), state, None),
        num_workers=num_workers,
        epochs=1,
        num_samples=total,
    )
