"""The node check runs end to end on this CPU machine, as a user would start it.

One ``python -m pipeline.doctor --config FILE --json FILE`` run (batch 16, DeepSpeed off,
started outside the project with relative paths) is shared by
the tests: its report has the three sections and every row's fields, the correctness
checks pass (the gather on two gloo processes, bf16, checkpoint resume), DeepSpeed is a
skip that says why, and the speed figures are positive numbers that agree with each
other. A mistake in the input is one line and exit code 2, before anything runs.
"""

from __future__ import annotations

import json
import math

import pytest
from train_helpers import PY, run

pytestmark = pytest.mark.slow  # spawns two gloo processes

SECTIONS = ("machine", "correctness", "speed")
FIELDS = {"check", "result", "figure", "unit", "status", "reason"}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """Started from a folder of the user's, with a config file named relative to it: the
    pretrain.py the doctor starts must find it there (it ran in the project's folder)."""
    folder = tmp_path_factory.mktemp("doctor")
    (folder / "mine.yaml").write_text("train:\n  batch_size: 16\n  max_minutes: 20\n")
    out = folder / "report.json"
    cmd = [PY, "-m", "pipeline.doctor", "--config", "mine.yaml", "--json", "report.json"]
    proc = run(
        [*cmd, "train.seed=1"],
        timeout=240,
        cwd=folder,
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1: a check failed (see below)
    assert "== correctness" in proc.stdout  # the table is printed too
    return json.loads(out.read_text()) | {"returncode": proc.returncode}


def _row(report: dict, section: str, start: str) -> dict:
    found = [r for r in report["sections"][section] if r["check"].startswith(start)]
    assert len(found) == 1, (start, [r["check"] for r in report["sections"][section]])
    return found[0]


def test_report_structure(report):
    """Catches: a section missing or renamed, a row without its fields or with a status
    outside the table's, an ``ok`` that ignores failures."""
    assert set(report) == {"config", "overrides", "wall_s", "ok", "sections", "returncode"}
    assert set(report["sections"]) == set(SECTIONS)
    assert report["wall_s"] > 0 and report["overrides"] == ["train.seed=1"]
    rows = [r for s in SECTIONS for r in report["sections"][s]]
    assert rows and all(set(r) == FIELDS for r in rows)
    assert {r["status"] for r in rows} <= {"pass", "fail", "skip", "warn", "info"}
    assert report["ok"] == all(r["status"] != "fail" for r in rows)
    assert report["returncode"] == (0 if report["ok"] else 1)
    machine = {r["check"] for r in report["sections"]["machine"]}
    assert {"torch", "CUDA", "NCCL", "cuDNN", "devices", "accelerate", "deepspeed"} <= machine
    assert _row(report, "machine", "CPU cores usable")["figure"] >= 1


def test_correctness_rows_pass(report):
    """Catches: a gather whose two processes differ from one process, a bf16 loss far
    from fp32, a resume that does not restore the weights or the optimizer."""
    gather = _row(report, "correctness", "gather_with_grad")
    assert gather["status"] == "pass" and "gloo" in gather["reason"]
    assert 0 <= gather["figure"] <= 1e-5
    assert _row(report, "correctness", "one bf16 DIM step")["status"] == "pass"
    resume = _row(report, "correctness", "checkpoint")
    assert resume["status"] == "pass" and resume["figure"] == 0
    deepspeed = _row(report, "correctness", "DeepSpeed")
    assert deepspeed["status"] == "skip" and "--deepspeed" in deepspeed["reason"]


def test_speed_figures_positive_and_consistent(report):
    """Catches: a rate of zero or NaN, workers per device not the ceiling of the two
    rates, an all-gather volume off the stated formula."""
    speed = report["sections"]["speed"]
    rates = [r for r in speed if r["unit"] == "img/s"]
    assert len(rates) >= 5  # step, bare, worker, loop, node
    assert all(isinstance(r["figure"], float) and math.isfinite(r["figure"]) for r in rates)
    assert all(r["figure"] > 0 for r in rates)
    step = _row(report, "speed", "DIM step img/s")["figure"]
    worker = _row(report, "speed", "input img/s per worker")["figure"]
    assert _row(report, "speed", "loader workers per device")["figure"] == math.ceil(step / worker)
    # pretrain.py itself ran (its own rate, from its metrics), and the plan uses the slower
    # of the loop and the bare step: the H200 showed the bare step alone 1.6x optimistic.
    loop = _row(report, "speed", "training loop img/s")
    assert "pretrain.py itself" in loop["reason"]
    ratio = _row(report, "speed", "loop / bare DIM step")["figure"]
    assert ratio == pytest.approx(step / loop["figure"])
    spare = _row(report, "speed", "cores can feed")["figure"]
    node = _row(report, "speed", "node img/s")["figure"]
    assert node == pytest.approx(min(step, loop["figure"], worker * spare))
    budget = _row(report, "speed", "steps in train.max_minutes")["figure"]
    assert budget == min(1000, int(20 * 60 * node / 16))  # max_steps 1000, batch 16
    times = [r for r in speed if r["unit"] == "s"]
    assert len(times) == 6 and all(r["figure"] > 0 for r in times)  # epoch and run, N = 1, 8, 64
    gathers = [r for r in speed if r["check"].startswith("infoNCE all-gather")]
    w1, w8, w64 = (r["figure"] for r in gathers)
    assert w1 == 0  # one process gathers nothing
    assert w8 > 0 and w64 / w8 == pytest.approx(63 / 7)  # (W - 1) * B * e


@pytest.mark.parametrize(
    ("args", "named"),
    [(["train.batch_sise=3"], "train.batch_size"), (["--jsn", "x.json"], "--jsn")],
    ids=["bad key", "bad option"],
)
def test_mistake_is_one_line_and_exit_2(args, named):
    """Catches: a traceback or argparse's two-line usage instead of one line, exit 1."""
    proc = run([PY, "-m", "pipeline.doctor", *args], timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dim-doctor: error:"), proc.stderr
    assert named in lines[0]  # did-you-mean, or the option refused


def test_allgather_traffic_counts_one_gather_per_view():
    """infoNCE gathers each view's image side once, however many pairs score it:
    twice the one-view traffic for two views, three times for three. Zero with one
    process."""
    from pipeline.config import load_config
    from pipeline.doctor.plan import allgather_rows

    cfg = load_config(None, ["model.fc_dim=32"])
    one, two, three = ([r.figure for r in allgather_rows(cfg, views)] for views in (1, 2, 3))
    assert one[0] == 0 and all(a > 0 for a in one[1:])
    assert all(t == 2 * o and h == 3 * o for o, t, h in zip(one, two, three, strict=True))


@pytest.mark.parametrize("views", [1, 2])
def test_step_rate_counts_images_of_the_data_as_the_loop_does(monkeypatch, views):
    """Catches a DIM step rate in encoder passes (batch x views) set beside the loop's
    and the loader's rates in images of the data: with two views the loop / step ratio
    read 2.37x for a loop 1.18x slower, and the workers needed came out doubled."""
    from pipeline.config import load_config
    from pipeline.doctor import speed

    monkeypatch.setattr(speed, "_timed_steps", lambda steppers, device: {"dim": 0.5, "bare": 0.25})
    cfg = load_config(None, ["model.fc_dim=32", "train.batch_size=8", f"data.views={views}"])
    rates = speed.step_speed(cfg)
    assert rates["views"] == views
    assert rates["dim"] == pytest.approx(8 / 0.5) and rates["bare"] == pytest.approx(8 / 0.25)


def test_bare_step_is_compiled_when_the_dim_step_is(monkeypatch):
    """Catches a DIM / bare ratio of a compiled DIM step over an eager backbone: with
    ``train.compile`` the doctor must compile the bare backbone as well."""
    from torch import nn

    from pipeline.config import load_config
    from pipeline.doctor import speed

    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compiled.append(type(self)))
    monkeypatch.setattr(speed, "_timed_steps", lambda steppers, device: {"dim": 1.0, "bare": 1.0})
    cfg = load_config(None, ["model.fc_dim=32", "train.batch_size=4", "train.compile=true"])
    speed.step_speed(cfg)
    bare = type(speed.create_backbone(cfg.model.backbone, img_size=32))
    assert bare in compiled and len(compiled) == 3  # encoder, objective, bare backbone
