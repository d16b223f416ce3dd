"""A new user's mistakes: each is one line naming the problem, a fixed exit code, no
traceback, and nothing written where the mistake is knowable before training.

One test per kind of mistake (output folder, bad values, backbone, shards, bad data,
reruns into an existing run, dim-report, file modes).
Every run is a subprocess with the tiny model of ``train_helpers``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from train_helpers import PY, ROOT, TINY, metrics, pretrain_cmd, run, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n=256)


def pretrain(
    *args: str, cwd: Path = ROOT, timeout: float = 300, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    return run(pretrain_cmd(*TINY, *args), timeout, cwd=cwd, env_update=extra_env)


def one_line_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The run failed with ``code`` and its last stderr line is the error naming ``words``."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert line.startswith("pretrain.py: error: "), proc.stderr[-3000:]
    for word in words:
        assert word in line, line
    return line


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------ the output folder


def test_empty_output_dir_writes_nothing_in_the_current_folder(shards, tmp_path):
    """Bug caught: an empty path meant '.', so a run wrote checkpoints into the cwd."""
    proc = pretrain(f"data.train_shards={shards}", "train.output_dir=", cwd=tmp_path)
    one_line_error(proc, 2, "train.output_dir is empty")
    assert tree(tmp_path) == []


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; /proc/sys is read-only
        return Path("/proc/sys/dim-run")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "run"


@pytest.mark.parametrize(
    "case, words",
    [
        ("file", "is a file, not a folder"),
        ("under_file", "cannot be created"),
        ("unwritable", "is not writable"),
    ],
)
def test_output_dir_that_cannot_hold_a_run(shards, tmp_path, case, words):
    """Bug caught: FileExistsError / NotADirectoryError / PermissionError tracebacks."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = {"file": blocker, "under_file": blocker / "run", "unwritable": _unwritable(tmp_path)}[
        case
    ]
    before = tree(tmp_path)
    one_line_error(
        pretrain(f"data.train_shards={shards}", f"train.output_dir={out}"),
        2,
        "train.output_dir",
        words,
    )
    assert tree(tmp_path) == before and blocker.read_text() == "x"


# ------------------------------------------------------------------ values and names


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lr=-1", ("train.lr must be > 0, got -1.0",)),
        ("loss.alpha=-1", ("loss.alpha must be >= 0, got -1.0",)),
        ("train.batch_size.x=3", ("train.batch_size is a single value, not a section",)),
        (
            "model.backbone=resnet_18",
            ("unknown model.backbone 'resnet_18'", "did you mean", "'resnet18'"),
        ),
        ("train.batch_size=1", ("train.batch_size=1 is too small", "at least 2 images")),
        ("train.warmup_steps=50", ("train.warmup_steps=50 is longer than the run",)),
        ("model.local_layer=9", ("model.local_layer=9 is out of range", "5 feature stages")),
        ("model.backbone_kwargs={bogus: 1}", ("model.backbone_kwargs", "'bogus'")),
        ("wandb.mode=online", ("wandb.mode=online needs an API key", "WANDB_API_KEY")),
    ],
)
def test_bad_value_is_refused_before_the_folder_exists(shards, tmp_path, override, words):
    """Bugs caught: torch's ValueError for lr < 0 after config.yaml was written; a negative
    weight training towards *less* information; a TypeError for a key under a value; an
    unknown backbone found only when the model is built, after config.yaml was written;
    BatchNorm's ValueError on a batch of one, a W&B UsageError without a key, and a local
    layer out of range, each after the run folder (config.yaml, wandb_id.txt) was written,
    so that the corrected rerun was refused as another configuration; a warm-up longer
    than the run silently cut while the card stated it."""
    out = tmp_path / "run"
    proc = pretrain(
        f"data.train_shards={shards}",
        f"train.output_dir={out}",
        "train.max_steps=20",
        override,
        extra_env={"WANDB_API_KEY": None, "WANDB_MODE": None, "HOME": str(tmp_path)},
    )
    one_line_error(proc, 2, *words)
    assert not out.exists()


def test_registered_backbone_passes_the_name_check():
    """A model registered with timm by this package (or a user) is a valid backbone."""
    import timm
    from timm.models import register_model

    from pipeline.models.backbones import check_backbone

    @register_model
    def dim_test_registered_net(pretrained=False, **kwargs):  # pragma: no cover - never built
        return timm.create_model("test_resnet", pretrained=pretrained, **kwargs)

    check_backbone("dim_test_registered_net")


def test_backbone_names_the_check_accepts_are_the_names_that_build(tmp_path):
    """One check for preflight and the build: ``hf-hub:`` is refused by both (a run never
    downloads), ``local-dir:`` of a model folder passes and builds, a missing folder is
    refused by both."""
    from pipeline.core.errors import ConfigError
    from pipeline.core.schema import ModelConfig
    from pipeline.models.backbones import check_backbone
    from pipeline.models.encoder import DIMEncoder, create_backbone
    from pipeline.share.export import export_encoder

    for name, needle in [
        ("hf-hub:someone/some-model", "never downloads"),
        (f"local-dir:{tmp_path / 'absent'}", "config.json missing"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            check_backbone(name)
        with pytest.raises(ConfigError, match=needle):
            create_backbone(name)
    model = ModelConfig("test_resnet", code_dim=8, fc_dim=16)
    export_encoder(DIMEncoder(model), tmp_path / "export", dataclasses.asdict(model))
    name = f"local-dir:{tmp_path / 'export'}"
    check_backbone(name)
    encoder = DIMEncoder(ModelConfig(name, code_dim=8, fc_dim=16))
    assert encoder(torch.randn(2, 3, 32, 32)).mu.shape == (2, 8)


@pytest.mark.parametrize("source", ["--zero_stage", "config file"])
def test_deepspeed_zero3_is_refused_before_the_folder_exists(shards, tmp_path, source):
    """ZeRO-3 asked for through ``accelerate launch --use_deepspeed --zero_stage 3`` or a
    DeepSpeed JSON file (the environment accelerate's launcher sets for each): one line
    naming the stages that work, nothing written. Catches the check removed, or reading
    only one of the two places the stage can come from."""
    if source == "config file":
        ds = tmp_path / "ds_zero3.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}))
        where = {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}
    else:
        where = {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    out = tmp_path / "run"
    proc = pretrain(
        f"data.train_shards={shards}",
        f"train.output_dir={out}",
        extra_env={"ACCELERATE_USE_DEEPSPEED": "true", **where},
    )
    one_line_error(proc, 2, "DeepSpeed ZeRO stage 3 is not supported", "stage 1 or 2")
    assert not out.exists()


def test_missing_shards_are_refused_before_the_folder_exists(tmp_path):
    out = tmp_path / "run"
    proc = pretrain(
        f"data.train_shards={tmp_path}/train-{{000..003}}.tar", f"train.output_dir={out}"
    )
    one_line_error(proc, 2, "data.train_shards", "match no file")
    assert not out.exists()


# ------------------------------------------------------------------ bad data


def _write_bad_shard(path: Path, kind: str) -> None:
    if kind == "empty":
        with tarfile.open(path, "w"):
            pass
        return
    with wds.TarWriter(str(path)) as writer:
        for i in range(300):
            sample = {"__key__": f"s{i:04d}", "cls": b"1"}
            if kind == "not_images":
                sample["jpg"] = b"these bytes are not a JPEG " * 4
            writer.write(sample)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("empty", "no samples in it"),
        (
            "no_images",
            "ValueError: no image (.jpg, .jpeg, .png, .webp); keys ['__key__', '__url__', 'cls']",
        ),
        ("not_images", "RuntimeError: decode_image"),
    ],
)
def test_unusable_shard_is_one_line_before_anything_is_written(tmp_path, kind, reason):
    """Bugs caught: 1,000 warning lines, two chained worker tracebacks, a reason cut off
    mid-word, and metrics.jsonl / wandb_id.txt / a wandb run left behind."""
    shard = tmp_path / "bad-000.tar"
    _write_bad_shard(shard, kind)
    out = tmp_path / "run"
    proc = pretrain(
        f"data.train_shards={shard}",
        f"train.output_dir={out}",
        "data.num_workers=2",
        "data.epoch_samples=64",
    )
    line = one_line_error(
        proc, 2, "the data is unusable", "1000 bad samples or shards in a row", str(shard), reason
    )
    assert line.endswith(reason) or kind == "not_images"  # in full, not cut off
    warnings = [ln for ln in proc.stderr.splitlines() if "skipped" in ln and "error" not in ln]
    assert len(warnings) <= 3  # the first few in full, the rest counted
    assert not out.exists()


# ------------------------------------------------------------------ reruns into a run folder


def test_rerun_finished_changed_and_longer(shards, tmp_path):
    """One run folder, five starts:
    - the finished run's files all share the umask's mode (safetensors wrote 0600);
    - rerun as is: 'complete', exit 0, no re-export, no second W&B run (bug: 'resumed',
      re-exported, a second offline W&B folder with the same id);
    - another backbone: refused with the differing key, config.yaml untouched (bug: the
      new config was written first, then a 70-line size-mismatch traceback);
    - another backbone with --force-config: the checkpoint does not fit, one line,
      config.yaml still untouched;
    - a longer train.max_steps continues the run: every step logged once."""
    out = tmp_path / "run"
    args = [
        f"data.train_shards={shards}",
        f"train.output_dir={out}",
        "train.log_every=1",
        "train.save_every=4",
    ]
    first = pretrain(*args, "train.max_steps=6")
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"exported the encoder to {out}" in first.stdout
    mask = os.umask(0)
    os.umask(mask)
    modes = {
        stat.S_IMODE(p.stat().st_mode)
        for p in out.rglob("*")
        if p.is_file() and "wandb" not in p.parts
    }
    assert modes == {0o666 & ~mask}
    exported = {p.name: p.stat().st_mtime_ns for p in (out / "export").iterdir()}
    saved_config = (out / "config.yaml").read_bytes()
    wandb_runs = sorted((out / "wandb").glob("offline-run-*"))

    again = pretrain(*args, "train.max_steps=6")
    assert again.returncode == 0 and "is complete" in again.stdout, again.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "export").iterdir()} == exported
    assert sorted((out / "wandb").glob("offline-run-*")) == wandb_runs

    other = pretrain(*args, "train.max_steps=6", "model.backbone=resnet10t")
    one_line_error(other, 2, "model.backbone: 'test_resnet' -> 'resnet10t'", "--force-config")
    forced = pretrain(*args, "train.max_steps=8", "model.backbone=resnet10t", "--force-config")
    one_line_error(forced, 2, "does not fit the configured model")
    assert (out / "config.yaml").read_bytes() == saved_config

    longer = pretrain(*args, "train.max_steps=8")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))


# ------------------------------------------------------------------ dim-report


def _report(*args: str) -> subprocess.CompletedProcess:
    no_key = {"HOME": "/nonexistent", "WANDB_MODE": None}
    return run([PY, "-m", "pipeline.report", *args], timeout=120, env_update=no_key)


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing", "metrics file not found"),
        ("folder", "is a folder"),
        ("no_key", "no W&B API key"),
    ],
)
def test_dim_report_mistakes_are_one_line(tmp_path, case, words):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb_id.txt").write_text("abc123\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "mi/global/jsd": 0.1}) + "\n")
    args = {
        "missing": ["--dry-run", "--metrics", str(tmp_path / "nope.jsonl")],
        "folder": ["--dry-run", "--metrics", str(run_dir)],
        "no_key": [str(run_dir)],
    }[case]
    proc = _report(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dim-report: error:") and words in lines[0]


def test_dim_report_reads_a_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb_id.txt").write_text("abc123\n")
    (run_dir / "config.yaml").write_text("wandb:\n  project: myproj\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "mi/global/jsd": 0.1}) + "\n")
    proc = _report(str(run_dir), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    structure = json.loads(proc.stdout)
    assert structure["project"] == "myproj"
    assert "'abc123'" in structure["sections"][0]["runsets"][0]["filters"]
    assert [p["metrics"] for p in structure["sections"][0]["panels"]] == [["mi/global/jsd"]]


def test_a_run_resumes_with_channels_last_turned_on(shards, tmp_path):
    """The step-speed options change how a step runs, not what it computes, so turning
    one on for the continuation of a run resumes it (it was refused as another
    configuration), from its checkpoint."""
    out = tmp_path / "run"
    first = pretrain(f"data.train_shards={shards}", f"train.output_dir={out}", "train.max_steps=2")
    assert first.returncode == 0
    again = pretrain(
        f"data.train_shards={shards}",
        f"train.output_dir={out}",
        "train.max_steps=4",
        "train.channels_last=true",
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and "step_0000002" in again.stdout
    assert [r["step"] for r in metrics(out)][-1] == 4


def test_config_differences_allow_schedule_and_logging_only():
    """Bug caught: a rerun with another lr (or any training key) silently continuing a
    run; and the opposite, a longer schedule or new W&B tags being refused."""
    from pipeline.config import load_config
    from pipeline.core.schema import Config
    from pipeline.train.run_folder import config_differences

    saved = Config().to_dict()
    same_run = load_config(
        None,
        [
            "train.max_steps=5000",
            "train.log_every=1",
            "wandb.tags=[x]",
            "data.num_workers=0",
            "train.output_dir=elsewhere",
            "train.compile=true",
            "train.channels_last=true",
            "train.keep_freed_memory=false",
        ],
    ).to_dict()
    assert config_differences(saved, same_run, Config().to_dict()) == []
    other = load_config(None, ["train.lr=0.5", "model.backbone=resnet10t"]).to_dict()
    assert config_differences(saved, other, Config().to_dict()) == [
        "model.backbone: 'dim_conv32' -> 'resnet10t'",
        "train.lr: 0.001 -> 0.5",
    ]
    older = {s: dict(body) for s, body in saved.items()}
    del older["loss"]["allow_negative_weights"]  # saved before the key existed: its default
    assert config_differences(older, Config().to_dict(), Config().to_dict()) == []


def test_a_manifest_whose_shards_are_gone_is_refused_up_front(tmp_path):
    """Bug caught: a manifest whose tar files were moved passed the shard check and the
    run ended after 1,000 read errors."""
    from pipeline.config import load_config
    from pipeline.core.errors import ConfigError
    from pipeline.data.write import prepare_digits
    from pipeline.train.preflight import check_shards

    manifest = prepare_digits(tmp_path / "digits", size=8, val_fraction=0.0)
    cfg = load_config(None, [f"data.train_shards={manifest}"])
    check_shards(cfg)
    for tar in (tmp_path / "digits").glob("*.tar"):
        tar.unlink()
    with pytest.raises(ConfigError, match=r"data.train_shards: .* shards that are not there"):
        check_shards(cfg)
