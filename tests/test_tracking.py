"""Tracker: W&B mode choice and metrics.jsonl truncation on resume (no W&B process)."""

from __future__ import annotations

import json

import pytest

from pipeline.core.schema import WandbConfig
from pipeline.share.tracking import Tracker, read_metrics, truncate_metrics, wandb_mode


def test_auto_mode_follows_api_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"
    assert wandb_mode("offline") == "offline"


def test_resume_drops_rows_after_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8))
        + '{"step": 8, "lo'
    )  # a row torn by a kill
    truncate_metrics(path, 5)
    assert [row["step"] for row in read_metrics(path, strict=True)] == [1, 2, 3, 4, 5]


def test_tracker_appends_rows(tmp_path):
    t = Tracker(tmp_path, WandbConfig(mode="disabled"), {})
    t.log({"mi/global/infonce": 0.5, "data/skipped": 0}, step=3)
    t.close()
    t = Tracker(tmp_path, WandbConfig(mode="disabled"), {}, resume_step=3)
    t.log({"mi/global/infonce": 0.7, "data/skipped": 1}, step=4)
    t.close()
    rows = read_metrics(tmp_path / "metrics.jsonl", strict=True)
    assert rows == [
        {"step": 3, "mi/global/infonce": 0.5, "data/skipped": 0},
        {"step": 4, "mi/global/infonce": 0.7, "data/skipped": 1},
    ]


def test_read_metrics_skips_a_torn_line_or_refuses_it_when_strict(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n[1, 2]\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 0.5}]
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2 "):
        read_metrics(path, strict=True)
