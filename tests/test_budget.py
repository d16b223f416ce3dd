"""A run sized by time (``train.max_minutes``, pipeline.train.budget): the plan's arithmetic,
the schedule following a re-planned length, and whole runs on one and two processes
that stop at their budget with the cosine at its end, agree on the last step, keep
their plan on a rerun."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from torch import nn
from train_helpers import ACCELERATE_LAUNCH, TINY, metrics, pretrain_cmd, run, write_shards

from pipeline.core.errors import ConfigError
from pipeline.core.schema import TrainConfig
from pipeline.train.budget import TimeBudget, steps_that_fit
from pipeline.train.optim import build_optimizer, build_scheduler, lr_factor

CAP = 100_000  # train.max_steps in the runs below: far more than the budget holds


def test_steps_that_fit():
    assert steps_that_fit(100, pace=2.0, seconds_left=50.0, cap=1000) == 200
    assert steps_that_fit(100, pace=2.0, seconds_left=50.7, cap=1000) == 201  # whole steps
    assert steps_that_fit(100, pace=2.0, seconds_left=5000.0, cap=1000) == 1000  # the ceiling
    assert steps_that_fit(100, pace=2.0, seconds_left=-3.0, cap=1000) == 100  # spent: stop here


def test_replan_measures_the_pace_from_its_first_call():
    """The first call (its steps include compiling) starts the pace's clock; later calls
    plan from steps per second since then, against what is left of the budget."""
    budget = TimeBudget(seconds=100.0, cap=CAP, planned=CAP)
    assert budget.replan(10, seconds=30.0) == CAP  # 30 s of start-up and compiling
    assert budget.replan(30, seconds=40.0) == 30 + 2 * 60  # 2 steps/s, 60 s left
    assert budget.replan(50, seconds=50.0) == 50 + 2 * 50
    assert budget.replan(70, seconds=70.0) == 70 + 45  # slower: 60 steps in 40 s, 30 s left
    resumed = TimeBudget(seconds=100.0, cap=CAP, planned=170)  # a new process, 60 s spent
    assert resumed.replan(100, seconds=65.0) == 170  # its first call keeps the saved plan
    assert resumed.replan(120, seconds=75.0) == 120 + 2 * 25  # 75 s spent, 25 left


def test_of_run_resumes_the_saved_plan():
    assert TimeBudget.of_run(0.0, CAP, {}) is None
    fresh = TimeBudget.of_run(2.0, CAP, {})
    assert (fresh.seconds, fresh.planned, fresh.left(20.0)) == (120.0, CAP, 100.0)
    resumed = TimeBudget.of_run(2.0, CAP, {"planned_steps": 700, "train_seconds": 31.5})
    assert resumed.planned == 700
    assert "0.5 spent before this resume" in resumed.line(31.5)
    assert TimeBudget.of_run(2.0, 500, {"planned_steps": 700}).planned == 500  # a lower cap


def test_negative_budget_is_refused():
    with pytest.raises(ConfigError, match="max_minutes"):
        TrainConfig(max_minutes=-1)


def test_the_schedule_follows_a_replanned_length():
    """The cosine reads train.max_steps at every step: planned shorter, it decays to zero
    at the new end (catches a schedule fixed when it was built)."""
    cfg = TrainConfig(lr=1.0, warmup_steps=2, max_steps=1000)
    opt = build_optimizer(nn.Linear(3, 3), cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(50):
        opt.step()
        sched.step()
    cfg.max_steps = 60
    seen = []
    for _ in range(10):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # the rate of step 50 was set when step 49 ended, under the old plan; then the new one
    assert math.isclose(seen[0], lr_factor(50, 2, 1000), rel_tol=1e-9)
    assert math.isclose(seen[1], lr_factor(51, 2, 60), rel_tol=1e-9)
    assert seen[-1] == pytest.approx(lr_factor(59, 2, 60)) and seen[-1] < 0.01


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"))


BUDGET_S = 12.0


def _budget_run(shards: str, out: Path, launcher=None) -> list[str]:
    return pretrain_cmd(
        *TINY,
        f"data.train_shards={shards}",
        f"train.output_dir={out}",
        f"train.max_steps={CAP}",
        "train.warmup_steps=10",
        f"train.max_minutes={BUDGET_S / 60}",
        "train.log_every=5",
        "train.save_every=100000",
        launcher=launcher,
    )


def _check_stopped_at_its_budget(out: Path) -> dict:
    rows = metrics(out)
    last = rows[-1]
    (ckpt,) = (out / "checkpoints").glob("step_*")
    meta = json.loads((ckpt / "meta.json").read_text())
    assert 20 < last["step"] < CAP and meta["step"] == last["step"] == meta["planned_steps"]
    assert last["budget/planned_steps"] == last["step"]
    assert last["lr"] < 0.02 * 2e-3  # the cosine reached its (planned) end
    # within the budget, give or take the last plan's few steps (a load spike aside)
    assert BUDGET_S * 0.8 < meta["train_seconds"] < BUDGET_S + 5
    assert (out / "export" / "model.safetensors").is_file()
    return meta


def test_a_budgeted_run_stops_at_its_budget_and_keeps_its_plan(shards, tmp_path):
    out = tmp_path / "budget"
    cmd = _budget_run(shards, out)
    proc = run(cmd)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "time budget: 0.2 min" in said
    meta = _check_stopped_at_its_budget(out)
    assert f"time budget 0.2 min: {meta['step']:,} steps in 0.2 min" in said
    again = run(cmd)  # complete by its plan: no more steps, although max_steps is far off
    assert again.returncode == 0 and "is complete" in again.stdout, again.stderr[-2000:]
    assert f"trained to step {meta['step']}" in again.stdout
    assert metrics(out)[-1]["step"] == meta["step"]
    # Killed before its export: the resume restores the plan, trains nothing, exports,
    # and the saved config keeps the configured ceiling, not the plan.
    shutil.rmtree(out / "export")
    assert run(cmd).returncode == 0 and (out / "export" / "model.safetensors").is_file()
    assert metrics(out)[-1]["step"] == meta["step"]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == CAP


@pytest.mark.slow  # two processes
def test_two_ranks_plan_the_same_last_step(shards, tmp_path):
    """Each rank plans from the all-reduced clock: a rank stopping one step before the
    other would leave it waiting in the next all-reduce (a hang, then the timeout)."""
    out = tmp_path / "budget2"
    launcher = [*ACCELERATE_LAUNCH, "--config_file", "launch/cpu.yaml"]
    assert run(_budget_run(shards, out, launcher), timeout=240).returncode == 0
    meta = _check_stopped_at_its_budget(out)
    assert meta["world_size"] == 2
