"""The shard writer: image folders, the bundled digits, torchvision datasets on disk."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.core.errors import ConfigError
from pipeline.data.digits import digits_tensor
from pipeline.data.loaders import dataset_size, eval_loader, resolve_shards
from pipeline.data.shards import read_manifest
from pipeline.data.write import (
    prepare_digits,
    prepare_folder,
    prepare_torchvision,
    split_indices,
)
from pipeline.prepare import main


def raw_samples(manifest) -> list[dict]:
    """Every stored sample, undecoded, through webdataset's own reader."""
    return list(wds.WebDataset(resolve_shards(str(manifest)), shardshuffle=False))


def make_folder(root, counts: dict[str, int]) -> dict[bytes, int]:
    """root/<class>/<i>.{png,jpg}: returns {image bytes: label}."""
    expected = {}
    for label, (name, count) in enumerate(sorted(counts.items())):
        (root / name).mkdir(parents=True)
        for i in range(count):
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            out = io.BytesIO()
            pixels = np.full((6, 6, 3), 10 * label + i, np.uint8)
            Image.fromarray(pixels).save(out, format=fmt)
            (root / name / f"{i}.{ext}").write_bytes(out.getvalue())
            expected[out.getvalue()] = label
    (root / sorted(counts)[0] / "notes.txt").write_text("not an image")
    return expected


def test_prepare_folder_round_trip_and_manifest(tmp_path):
    expected = make_folder(tmp_path / "src", {"cat": 5, "dog": 4, "eel": 3})
    manifest = prepare_folder(
        tmp_path / "src", tmp_path / "out", val_fraction=0.25, seed=3, max_samples=2
    )
    assert manifest == tmp_path / "out" / "train.json"
    train, val = read_manifest(manifest), read_manifest(tmp_path / "out" / "val.json")
    assert train.classes == val.classes == ["cat", "dog", "eel"]
    assert (train.num_samples, val.num_samples) == (9, 3)
    assert train.samples == [2, 2, 2, 2, 1] and len(val.shards) == 2
    assert json.loads(manifest.read_text())["shards"][0]["path"] == "train-000000.tar"
    assert dataset_size(str(manifest)) == 9
    stored = raw_samples(manifest) + raw_samples(tmp_path / "out" / "val.json")
    got = {s.get("jpg", s.get("png")): int(s["cls"]) for s in stored}
    assert got == expected  # every image, byte for byte, with its class index


def test_prepare_folder_shard_bytes_limit_and_idempotence(tmp_path):
    make_folder(tmp_path / "src", {"a": 3, "b": 3})
    out = tmp_path / "out"
    manifest = prepare_folder(tmp_path / "src", out, val_fraction=0.0, max_bytes=1)
    assert read_manifest(manifest).samples == [1] * 6  # a shard closes once past max_bytes
    assert not (out / "val.json").exists()
    stamp = manifest.stat().st_mtime_ns
    assert prepare_folder(tmp_path / "src", out, val_fraction=0.0) == manifest
    assert manifest.stat().st_mtime_ns == stamp  # reused, not rewritten
    prepare_folder(tmp_path / "src", out, val_fraction=0.0, overwrite=True, max_samples=4)
    assert read_manifest(manifest).samples == [4, 2]
    assert sorted(p.name for p in out.glob("train-*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
    ]


def test_prepare_digits_matches_digits_tensor(tmp_path):
    manifest = prepare_digits(tmp_path / "d", val_fraction=0.1, seed=0)
    train, val = read_manifest(manifest), read_manifest(tmp_path / "d" / "val.json")
    assert (train.num_samples, val.num_samples) == (1617, 180)
    assert train.classes == [str(d) for d in range(10)] and train.info["source"]["size"] == 32
    _, val_index = split_indices(1797, 0.1, 0)
    images, labels = digits_tensor(32)
    batch = next(
        iter(eval_loader(str(tmp_path / "d" / "val.json"), batch_size=180, img_size=32, in_chans=3))
    )
    assert batch["label"].tolist() == labels[val_index].tolist()
    assert torch.allclose(batch["image"], images[val_index], atol=1.01 / 127.5)  # uint8 rounding
    stamp = manifest.stat().st_mtime_ns
    assert prepare_digits(tmp_path / "d", val_fraction=0.1, seed=0) == manifest
    assert manifest.stat().st_mtime_ns == stamp


def test_cli_digits_native_size(tmp_path, capsys):
    assert (
        main(
            [
                "digits",
                str(tmp_path / "n"),
                "--size",
                "8",
                "--val-fraction",
                "0",
                "--shard-samples",
                "1000",
            ]
        )
        == 0
    )
    manifest = read_manifest(tmp_path / "n" / "train.json")
    assert manifest.samples == [1000, 797] and not (tmp_path / "n" / "val.json").exists()
    first = raw_samples(tmp_path / "n" / "train.json")[0]
    assert Image.open(io.BytesIO(first["png"])).size == (8, 8)
    assert "1797 samples in 2 shards" in capsys.readouterr().out


def fake_cifar10(root, n_per_batch: int = 3) -> None:
    """The on-disk layout torchvision.datasets.CIFAR10 reads (checksums patched away)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            "data": rng.integers(0, 255, (n_per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n_per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def test_prepare_torchvision_cifar10_on_disk(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as cifar

    fake_cifar10(tmp_path / "root")
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    manifest = prepare_torchvision("CIFAR10", tmp_path / "root", tmp_path / "out", val_fraction=0.2)
    assert read_manifest(manifest).num_samples == 12
    assert read_manifest(manifest).classes[0] == "airplane"
    reference = tvd.CIFAR10(str(tmp_path / "root"), train=True)
    stored = raw_samples(manifest) + raw_samples(tmp_path / "out" / "val.json")
    got = sorted(
        (np.asarray(Image.open(io.BytesIO(s["png"]))).tobytes(), int(s["cls"])) for s in stored
    )
    want = sorted((np.asarray(img).tobytes(), label) for img, label in reference)
    assert got == want  # lossless PNG
    test = prepare_torchvision(
        "CIFAR10",
        tmp_path / "root",
        tmp_path / "out",
        split="test",
        val_fraction=0.0,
        names=("test", "unused"),
    )
    assert test.name == "test.json" and read_manifest(test).num_samples == 3


@pytest.mark.parametrize(
    "call",
    [
        lambda p: prepare_folder(p / "absent", p / "out"),
        lambda p: prepare_torchvision("CIFAR10", p / "absent", p / "out"),
        lambda p: prepare_torchvision("NotADataset", p, p / "out"),
        lambda p: prepare_digits(p / "out", val_fraction=1.0),
    ],
)
def test_prepare_errors(tmp_path, call):
    with pytest.raises(ConfigError):
        call(tmp_path)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1), got 1.5"),
        (["--val-fraction", "-0.1"], "--val-fraction must be in [0, 1)"),
        (["--names", "train"], "--names takes two different comma-separated names"),
        (["--names", "a,a"], "--names takes two different"),
        (["--shard-samples", "0"], "--shard-samples and --shard-mb must be > 0"),
        (["--size", "4"], "--size must be >= 8"),
    ],
)
def test_cli_mistake_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, words):
    """Bugs caught: an out-of-range --val-fraction left an empty output folder; every
    mistake exited 1 where the other tools exit 2."""
    out = tmp_path / "out"
    assert main(["digits", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dim-prepare: error: ") and words in err[0], err
    assert not out.exists()


def test_cli_refuses_to_reuse_shards_of_another_source(tmp_path, capsys):
    """Bug caught: rerunning into a folder written from another source silently reused the
    old shards (only the split parameters were compared, and only warned about)."""
    out = tmp_path / "out"
    assert main(["digits", str(out), "--size", "8"]) == 0
    before = sorted(p.name for p in out.iterdir())
    src = tmp_path / "images" / "cat"
    src.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(src / "a.png")
    capsys.readouterr()
    assert main(["folder", str(tmp_path / "images"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "was written with" in err and "--force" in err, err
    assert main(["digits", str(out), "--size", "16"]) == 2  # same kind, other parameters
    assert sorted(p.name for p in out.iterdir()) == before
    assert main(["digits", str(out), "--size", "8"]) == 0  # the same request reuses them
    assert main(["folder", str(tmp_path / "images"), str(out), "--force"]) == 0


def photo_folder(root, n: int = 16) -> None:
    """root/<class>/<i>.jpg: photo-like JPEGs (a smooth field plus grain), landscape and
    portrait, and one small PNG that --max-size must leave as it is."""
    rng = np.random.default_rng(0)
    for i in range(n):
        size = (320, 240) if i % 2 else (240, 360)
        field = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
        base = np.asarray(field.resize(size, Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-10, 11, base.shape, dtype=np.int16)
        folder = root / ("a" if i % 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
        image.save(folder / f"{i}.jpg", quality=90)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "a" / "small.png")


def shard_bytes(manifest) -> int:
    return sum(os.path.getsize(path) for path in resolve_shards(str(manifest)))


def test_max_size_shards_are_smaller_keep_aspect_and_train(tmp_path, caplog):
    """``prepare folder --max-size N``: shorter side N, aspect kept, small images stored
    unchanged (never upscaled), fewer bytes, the saving reported; the real train loop
    trains on the shards. Bugs it would catch: the long side fitted instead of the short
    one, upscaling, the option ignored, a reused folder written without it."""
    from train_helpers import TINY

    from pipeline.config import load_config
    from pipeline.train.loop import train

    src = tmp_path / "src"
    photo_folder(src)
    full = prepare_folder(src, tmp_path / "full", val_fraction=0)
    with caplog.at_level("INFO", logger="pipeline.data.write"):
        small = prepare_folder(src, tmp_path / "small", val_fraction=0, max_size=64)
    report = [r.getMessage() for r in caplog.records if "--max-size" in r.getMessage()]
    assert len(report) == 1 and "16 of 17 images resized" in report[0], report
    assert "MB written" in report[0] and "ms per image" in report[0], report
    assert shard_bytes(small) < shard_bytes(full) / 3  # tar headers are 512 B a file
    originals = {s["__key__"]: s for s in raw_samples(full)}
    image_bytes = [
        sum(len(s.get("jpg", s.get("png"))) for s in samples)
        for samples in (raw_samples(small), originals.values())
    ]
    assert image_bytes[0] < image_bytes[1] / 5, image_bytes
    for sample in raw_samples(small):
        ext = "png" if "png" in sample else "jpg"
        image = Image.open(io.BytesIO(sample[ext]))
        before = Image.open(io.BytesIO(originals[sample["__key__"]][ext])).size
        if min(before) <= 64:
            assert sample[ext] == originals[sample["__key__"]][ext]  # stored unchanged
            continue
        assert min(image.size) == 64 and image.format == "JPEG", (before, image.size)
        assert abs(image.size[0] / image.size[1] - before[0] / before[1]) < 0.02
    with pytest.raises(ConfigError, match="max_size=64, not 32"):
        prepare_folder(src, tmp_path / "small", val_fraction=0, max_size=32)
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *TINY,
            f"data.train_shards={small}",
            "data.epoch_samples=16",
            f"train.output_dir={out}",
            "train.max_steps=3",
            "train.log_every=1",
            "train.save_every=3",
            "wandb.mode=disabled",
        ],
    )
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(np.isfinite(row["loss"]) for row in rows)


def test_cli_max_size_must_be_positive(tmp_path, capsys):
    src = tmp_path / "src"
    photo_folder(src, n=2)
    assert main(["folder", str(src), str(tmp_path / "out"), "--max-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dim-prepare: error: --max-size must be a positive number of pixels, got 0"]
    assert not (tmp_path / "out").exists()
