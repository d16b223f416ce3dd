"""The command line: --help lists every key, bad configuration is one line and exit 2."""

from __future__ import annotations

import subprocess

import pytest
from train_helpers import PY, ROOT, run


def _pretrain(*args: str) -> subprocess.CompletedProcess:
    return run([PY, str(ROOT / "pretrain.py"), *args], timeout=120)


def test_help_lists_keys_with_defaults():
    proc = _pretrain("--help")
    assert proc.returncode == 0
    for key in (
        "data.train_shards=",
        "train.batch_size=128",
        "train.max_steps=",
        "train.output_dir=",
        "model.backbone=dim_conv32",
        "loss.estimator=infonce",
        "train.save_every=",
        "train.seed=0",
        "wandb.mode=auto",
    ):
        assert key in proc.stdout, key


@pytest.mark.parametrize(
    "args, words",
    [
        (["train.bogus=1"], "train.bogus"),
        (["train.batch_size=abc"], "train.batch_size"),
        (["loss.estimator=nce"], "loss.estimator"),
        (["train.max_steps=0"], "train.max_steps"),
        (["--config", "/nonexistent.yaml"], "not found"),
        (
            [
                "model.backbone=no_such_net",
                "train.max_steps=1",
                "train.warmup_steps=0",
                "data.train_shards=",
            ],
            "backbone",
        ),
        (["data.train_shards=x.tar"], "match no file"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(args, words, tmp_path):
    proc = _pretrain(f"train.output_dir={tmp_path}", "data.train_shards=x.tar", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("pretrain.py: error:") and words in lines[-1]
    assert "Traceback" not in proc.stderr
