"""WebDataset streams: round trips, exactly-once evaluation, seeded training streams, bad data."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tarfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.core.errors import ConfigError
from pipeline.core.schema import DataConfig
from pipeline.data import loaders as data
from pipeline.data.augment import view_count
from pipeline.data.loaders import dataset_size, eval_loader, resolve_shards, train_loader
from pipeline.data.write import write_dataset

SIZE = 8  # tiny images keep decode and augmentation cheap


def image_bytes(value: int, fmt: str = "png", size: int = SIZE) -> bytes:
    """A solid grey image whose pixel value identifies it (JPEG keeps flat images exact)."""
    out = io.BytesIO()
    Image.fromarray(np.full((size, size), value % 256, np.uint8)).save(out, format=fmt)
    return out.getvalue()


def pixel(value: int) -> float:
    return (value % 256) / 255 * 2 - 1


def write_wds(folder: Path, counts: list[int], *, fmt: str = "jpg", extra=None) -> str:
    """Shards by webdataset's ShardWriter; sample ``i`` has label ``i % 10`` and value ``7 i``."""
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    with wds.ShardWriter(str(folder / "part-%04d.tar"), maxcount=10**6, verbose=0) as writer:
        for shard, count in enumerate(counts):
            if shard:
                writer.next_stream()  # uneven shards on purpose
            for _ in range(count):
                image = image_bytes(7 * i, "jpeg" if fmt == "jpg" else fmt)
                writer.write(
                    {
                        "__key__": f"s{i:05d}",
                        fmt: image,
                        "cls": str(i % 10).encode(),
                        **(extra(i) if extra else {}),
                    }
                )
                i += 1
    return str(folder / f"part-{{0000..{len(counts) - 1:04d}}}.tar")


def write_project(folder: Path, n: int, *, max_samples: int) -> str:
    """The project's writer (no val split); returns the manifest."""
    load = lambda i: (image_bytes(7 * i), "png", i % 10)  # noqa: E731
    return str(
        write_dataset(
            load,
            n,
            folder,
            classes=[str(c) for c in range(10)],
            val_fraction=0.0,
            max_samples=max_samples,
        )["train"]
    )


def read_all(spec: str, **kw) -> tuple[list[str], list[int], list[float], int]:
    loader = eval_loader(
        spec, batch_size=kw.pop("batch_size", 4), img_size=SIZE, in_chans=1, with_keys=True, **kw
    )
    keys, labels, values = [], [], []
    for batch in loader:
        keys += batch["key"]
        labels += batch["label"].tolist()
        values += batch["image"].mean(dim=(1, 2, 3)).tolist()
    return keys, labels, values, loader.skipped


def truncate_inside(path: Path, sample_index: int) -> None:
    """Cut a tar in the middle of the data of sample ``sample_index``'s image."""
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if not m.name.endswith((".cls", ".json"))]
    member = members[sample_index]
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


# ------------------------------------------------------------------- round trips


def test_round_trip_webdataset_shardwriter(tmp_path):
    spec = write_wds(tmp_path, [5, 3, 4])
    keys, labels, values, skipped = read_all(spec, batch_size=5)
    assert keys == [f"s{i:05d}" for i in range(12)]
    assert labels == [i % 10 for i in range(12)]
    assert values == pytest.approx([pixel(7 * i) for i in range(12)], abs=0.02)
    assert skipped == 0 and dataset_size(spec) is None


def test_round_trip_project_writer(tmp_path):
    manifest = write_project(tmp_path, 11, max_samples=4)
    assert len(resolve_shards(manifest)) == 3 and dataset_size(manifest) == 11
    pattern = str(tmp_path / "train-{000000..000002}.tar")
    assert dataset_size(pattern) == 11  # the manifest beside the shards gives the size
    keys, labels, values, _ = read_all(manifest)
    assert len(keys) == len(set(keys)) == 11
    # the writer shuffles; each sample still carries its own label and pixels
    by_value = sorted(zip(values, labels, strict=True))
    want = sorted((pixel(7 * i), i % 10) for i in range(11))
    assert [lab for _, lab in by_value] == [lab for _, lab in want]
    assert [v for v, _ in by_value] == pytest.approx([v for v, _ in want], abs=1e-6)


def test_png_webp_jpeg_and_rgb_output(tmp_path):
    for fmt in ("png", "webp", "jpeg"):
        spec = write_wds(tmp_path / fmt, [2], fmt=fmt)
        batch = next(iter(eval_loader(spec, batch_size=2, img_size=16, in_chans=3)))
        assert batch["image"].shape == (2, 3, 16, 16) and batch["label"].tolist() == [0, 1]


def test_label_from_json_field(tmp_path):
    spec = write_wds(
        tmp_path / "a", [4], extra=lambda i: {"json": json.dumps({"meta": {"y": 30 + i}})}
    )
    assert read_all(spec, label_key="json:meta.y")[1] == [30, 31, 32, 33]
    assert read_all(spec, label_key="none")[1] == [-1] * 4
    # auto: .cls first; without .cls, the json "label" field; without either, -1
    folder = tmp_path / "b"
    folder.mkdir()
    with wds.TarWriter(str(folder / "x.tar")) as writer:
        writer.write({"__key__": "a", "png": image_bytes(1), "json": b'{"label": 4}'})
        writer.write({"__key__": "b", "png": image_bytes(2)})
    assert read_all(str(folder / "x.tar"))[1] == [4, -1]


# ------------------------------------------------------------------- shard specs


def test_spec_forms(tmp_path):
    spec = write_wds(tmp_path, [2, 2, 2])
    shards = resolve_shards(spec)
    assert [Path(s).name for s in shards] == ["part-0000.tar", "part-0001.tar", "part-0002.tar"]
    assert resolve_shards(str(tmp_path / "part-*.tar")) == shards
    listed = f"{tmp_path}/part-{{0000,0001}}.tar, {tmp_path}/part-0002.tar"
    assert resolve_shards(listed) == shards
    piped = f"pipe:cat {shards[0]}"
    assert resolve_shards(piped) == [piped]
    assert read_all(piped)[1] == [0, 1]


@pytest.mark.parametrize(
    "spec, words",
    [
        ("", ["empty"]),
        ("{tmp}/nothing-{{000..003}}.tar", ["nothing-{000..003}.tar", "4 of 4"]),
        ("{tmp}/part-{{0000..0005}}.tar", ["3 of 6"]),
        ("{tmp}/nope-*.tar", ["nope-*.tar"]),
        ("{tmp}/missing.json", ["manifest not found"]),
        ("{tmp}", ["directory"]),
    ],
)
def test_missing_or_empty_specs_are_config_errors(tmp_path, spec, words):
    write_wds(tmp_path, [1, 1, 1])
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_shards(spec)
    assert all(w in str(err.value) for w in words), err.value
    with pytest.raises(ConfigError):  # before any stream starts
        train_loader(
            DataConfig(train_shards=spec),
            batch_size=2,
            img_size=SIZE,
            in_chans=1,
            seed=0,
            rank=0,
            world_size=1,
        )


# ------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("counts", [[3, 5, 2, 4, 1], [9]])  # shard split / sample split
def test_eval_two_ranks_two_workers_exactly_once(tmp_path, counts):
    spec = write_wds(tmp_path, counts)
    seen = []
    for rank in range(2):
        keys, _, _, _ = read_all(spec, rank=rank, world_size=2, num_workers=2, batch_size=2)
        assert keys == read_all(spec, rank=rank, world_size=2, num_workers=2, batch_size=2)[0]
        seen += keys
    assert sorted(seen) == [f"s{i:05d}" for i in range(sum(counts))]


# ------------------------------------------------------------------- training


def keys_of(cfg: DataConfig, batches: int, **kw) -> list[list[str]]:
    args = {
        "batch_size": 3,
        "img_size": SIZE,
        "in_chans": 1,
        "seed": 0,
        "rank": 0,
        "world_size": 1,
    } | kw
    loader = train_loader(cfg, with_keys=True, **args)
    return [b["key"] for b in islice(loader, batches)]


def test_train_streams_differ_per_rank_and_worker_and_repeat(tmp_path):
    cfg = DataConfig(
        train_shards=write_wds(tmp_path, [6, 6, 6, 6]),
        num_workers=0,
        shuffle_buffer=8,
        epoch_samples=60,
    )
    base = keys_of(cfg, 6)
    torch.manual_seed(123)  # the trainer's rng does not steer the stream
    assert keys_of(cfg, 6) == base
    assert keys_of(cfg, 6, seed=1) != base
    assert keys_of(cfg, 6, rank=1, world_size=2) != keys_of(cfg, 6, rank=0, world_size=2)
    two = DataConfig(**{**cfg.__dict__, "num_workers": 2})
    mixed = keys_of(two, 6)
    assert mixed == keys_of(two, 6)
    assert mixed[0::2] != mixed[1::2]  # batches alternate between the two workers


def test_uneven_shards_give_every_rank_the_same_epoch(tmp_path):
    spec = write_wds(tmp_path, [7, 1, 2])  # 3 shards over 2 ranks x 2 workers
    cfg = DataConfig(train_shards=spec, num_workers=2, shuffle_buffer=4, epoch_samples=40)
    lengths = [
        len(
            list(
                train_loader(
                    cfg,
                    batch_size=2,
                    img_size=SIZE,
                    in_chans=1,
                    seed=0,
                    rank=rank,
                    world_size=2,
                    epochs=1,
                )
            )
        )
        for rank in range(2)
    ]
    assert lengths == [10, 10]  # 40 // (2 x 2), dealt 5 + 5 over the workers


def test_train_batches_shapes_epochs_and_amdim(tmp_path):
    manifest = write_project(tmp_path, 10, max_samples=4)
    cfg = DataConfig(
        train_shards=manifest, num_workers=0, augment="amdim", augment_on="worker", shuffle_buffer=4
    )
    loader = train_loader(
        cfg, batch_size=3, img_size=12, in_chans=3, seed=0, rank=0, world_size=1, epochs=2
    )
    batches = list(loader)
    assert loader.batches_per_epoch == 3 and len(batches) == 6  # 10 samples // 3 per batch
    b = batches[0]
    assert b["image"].shape == b["image2"].shape == (3, 3, 12, 12)
    assert b["image"].dtype == torch.float32 and b["label"].dtype == torch.long
    assert b["image"].min() >= -1 and b["image"].max() <= 1 and b["skipped"] == 0
    assert not torch.equal(b["image"], b["image2"])  # independent views


def test_data_views_sets_the_views_per_image_on_both_augmentation_paths(tmp_path):
    """``data.views=3``: the worker path yields image, image2, image3 (all different),
    the batched path draws three views; a non-random recipe refuses more than one."""
    from pipeline.data.batch_augment import build_batch_augment

    manifest = write_project(tmp_path, 6, max_samples=6)
    cfg = DataConfig(
        train_shards=manifest, num_workers=0, augment_on="worker", shuffle_buffer=4, views=3
    )
    b = next(
        iter(train_loader(cfg, batch_size=3, img_size=12, in_chans=3, seed=0, rank=0, world_size=1))
    )
    views = [b["image"], b["image2"], b["image3"]]
    assert "image4" not in b and all(v.shape == (3, 3, 12, 12) for v in views)
    assert not any(torch.equal(views[i], views[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    batched = dataclasses.replace(cfg, augment_on="batch")
    assert build_batch_augment(batched, img_size=12, seed=0, rank=0).views == 3
    with pytest.raises(ConfigError, match="needs a random"):
        view_count(dataclasses.replace(cfg, augment="none"))


def test_train_counts_corrupt_images_across_workers(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    with wds.TarWriter(str(folder / "a.tar")) as writer:
        for i in range(4):
            jpg = b"\xff\xd8 garbage, not a JPEG" if i == 2 else image_bytes(i, "jpeg")
            writer.write({"__key__": f"k{i}", "jpg": jpg, "cls": b"1"})
    for workers in (0, 2):
        cfg = DataConfig(
            train_shards=str(folder / "a.tar"),
            num_workers=workers,
            shuffle_buffer=0,
            epoch_samples=60,
        )
        loader = train_loader(
            cfg, batch_size=3, img_size=SIZE, in_chans=1, seed=0, rank=0, world_size=1
        )
        # each worker's pass is good, good, corrupt, good: its n-th batch has seen n corrupt,
        # and the main process sums the workers' latest counts
        assert [b["skipped"] for b in islice(loader, 8)] == list(range(1, 9))


def test_train_counts_samples_lost_to_a_truncated_shard(tmp_path):
    manifest = write_project(tmp_path, 6, max_samples=6)
    truncate_inside(Path(resolve_shards(manifest)[0]), 3)  # samples 3, 4, 5 are lost
    cfg = DataConfig(train_shards=manifest, num_workers=0, shuffle_buffer=0, epoch_samples=30)
    loader = train_loader(
        cfg, batch_size=3, img_size=SIZE, in_chans=1, seed=0, rank=0, world_size=1
    )
    # webdataset's batched() emits a batch when the next sample arrives, i.e. after the
    # pass's loss marker: every batch has seen one more truncation
    assert [b["skipped"] for b in islice(loader, 4)] == [3, 6, 9, 12]


@pytest.mark.parametrize("workers", [0, 2])
def test_all_bad_data_is_one_error_naming_shard_and_reason(tmp_path, workers, caplog):
    """Unusable data stops with one ConfigError (not a worker's chained traceback) that
    names the shard and the reason in full; only the first few warnings are logged."""
    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(3):
            writer.write({"__key__": f"a{i}", "jpg": b"not an image", "cls": b"0"})
    cfg = DataConfig(
        train_shards=str(path),
        num_workers=workers,
        shuffle_buffer=0,
        max_bad_streak=40,
        epoch_samples=60,
    )
    with (
        caplog.at_level(logging.WARNING, logger="pipeline.data.loaders"),
        pytest.raises(ConfigError) as err,
    ):
        next(
            iter(
                train_loader(
                    cfg, batch_size=2, img_size=SIZE, in_chans=1, seed=0, rank=0, world_size=1
                )
            )
        )
    message = str(err.value)
    assert "40 bad samples or shards in a row" in message and str(path) in message
    assert "most common reason (40 of 40): RuntimeError" in message and "\n" not in message
    assert len(caplog.records) == data.WARN_IN_FULL  # from the stream that gave up


# ------------------------------------------------------------------- bad data in evaluation


@pytest.mark.parametrize("writer", ["webdataset", "project"])
def test_corrupt_jpeg_and_truncated_tar_are_skipped_and_counted(tmp_path, writer, caplog):
    if writer == "webdataset":
        counts, spec = [4, 5, 6, 3], write_wds(tmp_path, [4, 5, 6, 3])
        lost = 1  # no manifest: a truncated shard counts the one sample it was reading
    else:
        counts, spec = [5, 5, 5, 3], write_project(tmp_path, 18, max_samples=5)
        lost = 5 - 2  # the manifest says the shard had 5
    shards = [Path(s) for s in resolve_shards(spec)]
    # a corrupt JPEG in the middle of shard 1, and shard 2 cut inside its third image
    with tarfile.open(shards[1]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    image_names = sorted(n for n in members if not n.endswith(".cls"))
    with tarfile.open(shards[1], "w") as tar:
        for name, payload in sorted(members.items()):
            if name == image_names[2]:
                payload = payload[:40] + b"\x00" * 30  # a damaged image body
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    truncate_inside(shards[2], 2)
    expected_ok = sum(counts) - 1 - (counts[2] - 2)  # less the corrupt one and the cut-off ones
    keys, _, _, skipped = read_all(spec, num_workers=2, rank=0, world_size=1)
    assert len(keys) == len(set(keys)) == expected_ok
    assert skipped == 1 + lost
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loaders"):
        assert read_all(spec)[3] == 1 + lost  # in-process, so the log is visible here
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert shards[1].name in messages and shards[2].name in messages


def _loader_read_with_sigterm_blocked(tmp_path, batches: int):
    """A train loader whose 2 workers start with SIGTERM blocked, as the train loop starts
    them, after ``batches`` batches (an epoch is 4); with its worker processes."""
    import multiprocessing
    import signal

    cfg = DataConfig(
        train_shards=write_project(tmp_path, 12, max_samples=4), num_workers=2, epoch_samples=8
    )
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        loader = train_loader(
            cfg, batch_size=2, img_size=SIZE, in_chans=3, seed=0, rank=0, world_size=1
        )
        before = set(multiprocessing.active_children())
        assert len(list(islice(iter(loader), batches))) == batches
        workers = set(multiprocessing.active_children()) - before
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert len(workers) == 2
    return loader, workers


def test_close_stops_workers_that_ignore_sigterm(tmp_path):
    """The train loop starts workers with SIGTERM blocked, so they ignore the SIGTERM of
    DataLoader's shutdown; close() must still end them, mid-pass and after persistent
    workers crossed an epoch, or the interpreter waits for them at exit."""
    loader, workers = _loader_read_with_sigterm_blocked(tmp_path, 6)
    loader.close()
    assert not any(w.is_alive() for w in workers)
    loader.close()  # a second close (atexit after the normal one) does nothing
    with pytest.raises(RuntimeError, match="closed"):
        iter(loader)


def test_close_kills_lingering_workers_without_a_worker_failure(tmp_path):
    """A worker close() kills on purpose is not a failed worker. Where DataLoader's
    iterator outlives the loader (a traceback's frames hold it; the first H200 run's
    SIGTERM stop did), its pids stay registered with the SIGCHLD handler DataLoader
    installs, and the kill came back as 'DataLoader worker (pid N) is killed by signal:
    Killed' after the last checkpoint. Catches: the handler left in place during the kill."""
    import signal

    loader, workers = _loader_read_with_sigterm_blocked(tmp_path, 2)
    held = loader.loader._iterator  # outlives the loader, as a traceback would keep it
    assert held is not None
    handler = signal.getsignal(signal.SIGCHLD)
    loader.close()
    time.sleep(0.2)  # a SIGCHLD arriving late would raise here
    assert not any(w.is_alive() for w in workers)
    assert signal.getsignal(signal.SIGCHLD) is handler  # DataLoader's handler is back
    del held


def test_images_in_any_mode_pil_writes_decode_to_eight_bits(tmp_path):
    """Bug caught: a 16-bit PNG decoded as uint16 and broke the batch (every other mode
    PIL writes into png / jpeg / webp decodes to 8 bits); it is scaled to 8 bits."""
    import numpy as np
    from PIL import Image

    from pipeline.data.loaders import eight_bit

    values = np.arange(0, 65536, 1024, dtype=np.uint16).reshape(8, 8)
    modes = {
        "I;16": Image.fromarray(values),
        "P": Image.new("P", (8, 8), 3),
        "LA": Image.new("LA", (8, 8), (200, 100)),
        "CMYK": Image.new("CMYK", (8, 8), (0, 255, 0, 0)),
    }
    folder = tmp_path / "s"
    folder.mkdir()
    with wds.TarWriter(str(folder / "x.tar")) as writer:
        for i, (mode, image) in enumerate(modes.items()):
            buf = io.BytesIO()
            image.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
            writer.write(
                {"__key__": f"{i}", "png" if mode != "CMYK" else "jpg": buf.getvalue(), "cls": b"0"}
            )
    spec = str(folder / "x.tar")
    batch = next(iter(eval_loader(spec, batch_size=4, img_size=8, in_chans=3)))
    assert batch["image"].shape == (4, 3, 8, 8) and torch.isfinite(batch["image"]).all()
    cfg = DataConfig(train_shards=spec, num_workers=0, shuffle_buffer=0, epoch_samples=4)
    loader = train_loader(
        cfg, batch_size=4, img_size=8, in_chans=3, seed=0, rank=0, world_size=1, epochs=1
    )
    batch = next(iter(loader))  # workers decode, the step augments: 8-bit images expected
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 8, 8)
    scaled = eight_bit(torch.from_numpy(values.astype(np.int32)).to(torch.uint16)[None])
    assert scaled.dtype == torch.uint8 and scaled.max() == 64512 // 257 and scaled.min() == 0
