"""Checkpoints: atomic saves (an interrupted save keeps the previous one), rotation, resume."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.checkpoint import (
    clean_partial_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _prepared(accelerator):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return accelerator.prepare(model, opt)


def _step(model, opt):
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_interrupted_save_keeps_previous(accelerator, tmp_path, monkeypatch):
    model, opt = _prepared(accelerator)
    _step(model, opt)
    save_checkpoint(accelerator, tmp_path, 1, {"samples_seen": 8}, keep_last=2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt)

    real = accelerator.save_state

    def dies_midway(path):
        real(path)  # the files are written...
        raise KeyboardInterrupt("killed during save")  # ...but the save never completes

    monkeypatch.setattr(accelerator, "save_state", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 2, {"samples_seen": 16}, keep_last=2)
    monkeypatch.undo()

    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_0000001"
    assert load_checkpoint(accelerator, latest)["samples_seen"] == 8
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    clean_partial_checkpoints(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000001"]


def test_keep_last_and_resave(accelerator, tmp_path):
    model, opt = _prepared(accelerator)
    for step in (1, 2, 3, 4, 4):
        _step(model, opt)
        save_checkpoint(accelerator, tmp_path, step, {"tag": f"t{step}"}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    assert read_checkpoint_meta(latest_checkpoint(tmp_path))["step"] == 4


def test_share_mode_opens_private_folders_and_files(tmp_path):
    """mkdtemp folders (0700) and safetensors files (0600) get the umask's modes, so a
    group sharing the run folder can read checkpoints and exports."""
    import os
    import stat
    import tempfile
    from pathlib import Path

    from pipeline.core.files import share_mode

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / "sub").mkdir(mode=0o700)
    weights = folder / "sub" / "model.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(0o600)
    mask = os.umask(0o022)
    try:
        share_mode(folder)
    finally:
        os.umask(mask)
    assert stat.S_IMODE(folder.stat().st_mode) == stat.S_IMODE((folder / "sub").stat().st_mode)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644


def test_human_bytes_uses_binary_units_throughout():
    """One formatter for every size a tool prints (export's listing, doctor's traffic)."""
    from pipeline.core.files import human_bytes

    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(256 * 2**20) == "256.0 MiB"
    assert human_bytes(3 * 2**30) == "3.0 GiB"
    assert human_bytes(5 * 2**40) == "5120.0 GiB"
