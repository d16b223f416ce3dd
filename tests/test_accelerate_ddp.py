"""The real DIM model under ``accelerate launch`` with two CPU processes and DDP.

``tests/ddp_worker.py`` does the distributed part; this test launches it the way users
do (``launch/cpu.yaml``: accelerate's multi-process launcher with ``Accelerator(cpu=True)``
selecting gloo; ``--cpu`` alone would start a single process) and checks its JSON:

- two gloo processes really ran (world size 2, MULTI_CPU);
- the DDP-averaged gradient of the first step (eval mode: batch-independent encoder)
  equals the gradient of one process on the concatenated batch, timm backbone included;
- after a few optimizer steps the replicas are still identical and have moved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402

pytestmark = pytest.mark.slow  # multi-process
ATOL = 1e-5


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",  # `accelerate launch`
        "--config_file",
        str(ROOT / "launch/cpu.yaml"),
        "--num_processes",
        "2",
        str(ROOT / "tests/ddp_worker.py"),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"accelerate launch failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return json.loads((out / "result.json").read_text()), torch.load(out / "step0.pt")


def test_two_gloo_processes(launched):
    result, _ = launched
    assert result["world_size"] == 2
    assert result["backend"] == "gloo"
    assert result["distributed_type"].endswith("MULTI_CPU")


def test_ddp_gradient_equals_one_process_on_the_whole_batch(launched):
    _, step0 = launched
    model = ddp_worker.make_model()
    model.load_state_dict(step0["initial"])
    model.eval()
    loss, _ = model(step0["images"])
    loss.backward()
    torch.testing.assert_close(step0["loss"], loss.detach(), atol=ATOL, rtol=0)
    grads = dict(model.named_parameters())
    assert step0["grads"].keys() == grads.keys()
    for name, p in grads.items():
        torch.testing.assert_close(
            step0["grads"][name],
            p.grad,
            atol=ATOL,
            rtol=0,
            msg=lambda m, name=name: f"gradient of {name}: {m}",
        )


def test_replicas_stay_identical_and_train(launched):
    result, _ = launched
    sums = result["rank_checksums"]
    assert len(sums) == 2 and len(sums[0]) > 10
    assert result["max_rank_difference"] == 0.0
    assert result["max_change_from_init"] > 1e-4
    assert all(x == x and abs(x) < 1e4 for x in result["losses"])
