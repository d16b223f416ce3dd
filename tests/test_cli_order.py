"""pretrain.py takes its options and key=value overrides in any order."""

from __future__ import annotations

import pytest
from train_helpers import PY, ROOT, run

from pipeline.pretrain import parse_args

DIGITS = str(ROOT / "configs" / "digits.yaml")


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", DIGITS, "train.output_dir=runs/x", "train.batch_size=4", "--force-config"],
        ["train.output_dir=runs/x", "--config", DIGITS, "train.batch_size=4", "--force-config"],
        ["train.output_dir=runs/x", "--force-config", "train.batch_size=4", f"--config={DIGITS}"],
    ],
)
def test_options_and_overrides_in_any_order(argv):
    """Catches: --config or --force-config after an override refused as "unrecognized
    arguments", or an override after an option dropped."""
    cfg, force = parse_args(argv)
    assert force is True
    assert cfg.train.output_dir == "runs/x" and cfg.train.batch_size == 4  # the overrides
    assert cfg.model.local_layer == 1 and cfg.loss.global_critic == "none"  # the file


def test_config_between_overrides_from_the_command_line(tmp_path):
    """The file given between overrides is read (a missing one is named), not refused
    with "unrecognized arguments"."""
    missing = tmp_path / "none.yaml"
    where = f"train.output_dir={tmp_path}"
    argv = [where, "--config", str(missing), "train.max_steps=1"]
    proc = run([PY, str(ROOT / "pretrain.py"), *argv], timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pretrain.py: error:") and str(missing) in last and "not found" in last
