"""The thread choice: the rule on made-up machines, a user's settings kept, the restart that
sets OpenMP's wait policy, and the line a real run says at its start."""

from __future__ import annotations

import re

import pytest
import torch
from train_helpers import TINY, pretrain_cmd, run, write_shards

from pipeline.config import load_config
from pipeline.doctor.machine import threads_row
from pipeline.train.threads import (
    PASSIVE,
    RESTARTED,
    Threads,
    apply,
    choose,
    restart_command,
    usable_cores,
)


@pytest.mark.parametrize(
    ("affinity", "workers", "env", "threads"),
    [
        (2, 0, {}, 2),  # a quiet 2-core machine, reading in the main process
        (2, 1, {}, 1),  # one loader worker takes a core
        (2, 5, {}, 1),  # more workers than cores: still one thread
        # SLURM caps the mask, two local processes share it, three workers each: 16/2-3.
        # Ignoring SLURM gives 29, the processes 13, the workers 8.
        (64, 3, {"SLURM_CPUS_PER_TASK": "16", "LOCAL_WORLD_SIZE": "2"}, 5),
        (4, 0, {"SLURM_CPUS_PER_TASK": "32"}, 4),  # a mask smaller than SLURM's count wins
        (8, 0, {"SLURM_CPUS_PER_TASK": "8", "LOCAL_WORLD_SIZE": "4"}, 2),
        (16, 1, {"LOCAL_SIZE": "4"}, 3),  # DeepSpeed's launcher names it LOCAL_SIZE
        (4, 0, {"SLURM_CPUS_PER_TASK": "two", "LOCAL_WORLD_SIZE": "0"}, 4),  # junk: ignored
    ],
)
def test_rule(affinity, workers, env, threads):
    """Catches: a budget that ignores the mask, SLURM, the local processes or the workers,
    a count below one, an unparsable variable taken at face value."""
    choice = choose(affinity=affinity, num_workers=workers, env=env)
    assert choice.threads == threads
    # More than one thread: OpenMP waits passively; one: nothing to set.
    assert choice.wait_policy == (PASSIVE if threads > 1 else None)


def test_line_names_the_inputs():
    line = choose(
        affinity=64, num_workers=3, env={"SLURM_CPUS_PER_TASK": "16", "LOCAL_WORLD_SIZE": "2"}
    ).line()
    assert line == (
        "threads: 5 intra-op per process (64 cores in the affinity mask, "
        "SLURM_CPUS_PER_TASK=16, 2 local processes, 3 loader workers), OMP_WAIT_POLICY=PASSIVE"
    )
    one = choose(affinity=2, num_workers=1, env={}).line()
    assert one.startswith("threads: 1 intra-op per process (2 cores in the affinity mask, ")
    assert "1 local process, 1 loader worker)" in one and "one thread" in one


def test_user_settings_kept():
    """Catches: OMP_NUM_THREADS or a wait policy the user (or the launcher) set being
    replaced, train.threads not winning over the environment, a kept count not said."""
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    kept = choose(affinity=2, num_workers=1, env=env)
    assert kept.threads == 3 and kept.wait_policy is None
    assert "OMP_NUM_THREADS=3 from the environment, kept; the cores would give 1" in kept.why
    assert kept.wait_why == "OMP_WAIT_POLICY=ACTIVE from the environment, kept"
    assert choose(affinity=8, num_workers=0, env={"OMP_NUM_THREADS": "4,2"}).threads == 4
    spin = choose(affinity=8, num_workers=0, env={"GOMP_SPINCOUNT": "1000"})
    assert spin.threads == 8 and spin.wait_policy is None and "GOMP_SPINCOUNT=1000" in spin.wait_why
    asked = choose(affinity=2, num_workers=0, requested=6, env=env)
    assert asked.threads == 6 and "train.threads=6; OMP_NUM_THREADS=3 overridden" in asked.why
    # A count that was given (not chosen here) keeps OpenMP's spinning: no restart.
    for given in (
        choose(affinity=2, num_workers=1, requested=2, env={}),
        choose(affinity=2, num_workers=1, env={"OMP_NUM_THREADS": "2"}),
    ):
        assert given.threads == 2 and given.wait_policy is None
        assert "a count that was given" in given.wait_why


def test_restart_command():
    """Catches: a restart without the policy, one that loops (the restarted command would
    restart again), one where nothing needs setting, a command line not kept."""
    choice = choose(affinity=4, num_workers=0, env={})
    argv = ["python", "pretrain.py", "--config", "x.yaml", "train.max_steps=3"]
    exe, new_argv, env = restart_command(choice, {"A": "1"}, argv, "/venv/bin/python")
    assert exe == "/venv/bin/python" and new_argv == ["/venv/bin/python", *argv[1:]]
    assert env == {"A": "1", "OMP_WAIT_POLICY": PASSIVE, RESTARTED: "1"}
    assert restart_command(choice, env, argv, exe) is None  # restarted once already
    assert restart_command(choose(affinity=1, num_workers=0, env={}), {}, argv, exe) is None
    # After the restart the choice says where the policy came from and sets nothing.
    again = choose(affinity=4, num_workers=0, env=env)
    assert again.wait_policy is None and "restarted itself" in again.wait_why


def test_apply_sets_torch_threads_and_says_a_policy_left_unset():
    before = torch.get_num_threads()
    try:
        done = apply(Threads(3, "test", PASSIVE, "OMP_WAIT_POLICY=PASSIVE"))
        assert torch.get_num_threads() == 3
        assert "not applied" in done.line()  # in-process: too late for OpenMP's policy
    finally:
        torch.set_num_threads(before)


def test_doctor_row(monkeypatch):
    """The node check says what training will take: one process per device here."""
    for var in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    row = threads_row(load_config(None, ["data.num_workers=1"]))
    assert (row.section, row.figure, row.unit) == ("machine", 3, "threads")
    assert "4 cores in the affinity mask, 1 local process, 1 loader worker" in row.reason


@pytest.mark.slow  # one tiny run, restarted once: two imports of torch
@pytest.mark.skipif(usable_cores() < 2, reason="the automatic choice is one thread here")
def test_real_run_says_the_choice_and_openmp_gets_the_policy(tmp_path):
    """Catches: no line at the start, a restart that never happens or never reaches
    OpenMP (libgomp prints what it read at start-up: the spin count must go 300000 -> 0)."""
    shards = write_shards(tmp_path / "shards", n=64, per_shard=64)
    out = tmp_path / "run"
    proc = run(
        pretrain_cmd(
            *TINY,
            f"data.train_shards={shards}",
            "data.epoch_samples=64",
            "train.max_steps=1",
            "train.warmup_steps=0",
            f"train.output_dir={out}",
            "wandb.mode=disabled",
        ),
        env_update={"OMP_NUM_THREADS": None, "OMP_DISPLAY_ENV": "verbose"},
    )
    assert proc.returncode == 0
    said = [line for line in proc.stdout.splitlines() if line.startswith("threads: ")]
    assert len(said) == 1 and said[0].endswith(
        "0 loader workers), OMP_WAIT_POLICY=PASSIVE "
        "(set before torch loaded OpenMP: the command restarted itself)"
    ), said
    spins = re.findall(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)
    assert spins[0] == "300000" and spins[1] == "0", spins
