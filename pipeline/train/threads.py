"""How many CPU threads a training process gives torch, and how its OpenMP threads wait.

torch's defaults assume the machine is its own: one intra-op thread per core in the
affinity mask, whatever else runs there (the run's other local processes, this process's
loader workers, other jobs), and OpenMP threads (GNU libgomp in torch's wheels) that spin
for about 3 ms before sleeping whenever a parallel region ends. When another job holds
one of the cores, each region waits for the thread that lost its core while the others
spin on theirs: ``configs/cifar10_cpu.yaml`` trained at 35-51 img/s beside one evaluation
job, against 220-370 img/s on one thread.

The rule (``choose``): the cores this process may use are the affinity mask, capped by
``SLURM_CPUS_PER_TASK``, shared evenly by the local processes; each loader worker takes
one of them; the rest, at least one, are torch's intra-op threads. With more than one
thread so chosen, OpenMP waits passively (``OMP_WAIT_POLICY=PASSIVE``: a thread with
nothing to do sleeps at once and its core goes to whoever needs it). A count the user gave
(``train.threads``, else ``OMP_NUM_THREADS``, which ``accelerate launch`` and ``torchrun``
also set) and a wait policy they gave (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``) are kept;
a given count keeps OpenMP's spinning, since it says the cores are the run's: for the
paper's small CIFAR encoder (``benchmarks/threads.py``, docs/training.md "Threads") two
spinning threads ran 314 img/s on a quiet machine and 96 beside one busy process, two
passive ones 168 and 185, one thread 178 and 188. Passive waiting pays a wake-up per
parallel region, which small convolutions feel most.

libgomp reads the wait policy once, when ``import torch`` loads it (``OMP_DISPLAY_ENV``
shows a value set in ``os.environ`` after that import is ignored), and importing
``pipeline`` imports torch. So a command that needs the policy restarts itself with it in
its environment (``restart_for_wait_policy``: ``execve``, so the pid, and with it what a
launcher watches, stays the same); the thread count can change at any time (``apply``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pipeline.core.schema import Config

__all__ = ["Threads", "apply", "choose", "for_config", "restart_for_wait_policy", "use_threads"]

# Where launchers put the number of processes on this node: torchrun (and accelerate,
# which runs it), DeepSpeed's launcher, MPI.
LOCAL_PROCESS_VARS = (
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
)
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
PASSIVE = "PASSIVE"
RESTARTED = "DIM_THREADS_RESTARTED"  # set in the environment of a restarted command


@dataclass(frozen=True)
class Threads:
    """The choice: intra-op threads, the wait policy still to set (None: nothing to set),
    and why, in words."""

    threads: int
    why: str
    wait_policy: str | None
    wait_why: str

    def line(self) -> str:
        return f"threads: {self.threads} intra-op per process ({self.why}), {self.wait_why}"


def _positive(value: str | None) -> int | None:
    """A positive count from an environment value (``"4"``, or ``"4,2"`` for nested
    OpenMP levels: the first), else None."""
    head = (value or "").split(",")[0].strip()
    return int(head) if head.isdigit() and int(head) > 0 else None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('ss') else 's'}"


def choose(
    *, affinity: int, num_workers: int, requested: int = 0, env: Mapping[str, str]
) -> Threads:
    """The thread count and wait policy for one process (pure: everything comes in).

    ``affinity``: cores in this process's affinity mask; ``num_workers``: its loader
    workers; ``requested``: ``train.threads`` (0: choose); ``env``: the environment.
    """
    slurm = _positive(env.get("SLURM_CPUS_PER_TASK"))
    local = next((n for n in map(_positive, map(env.get, LOCAL_PROCESS_VARS)) if n), 1)
    cores = min(affinity, slurm) if slurm else affinity
    auto = max(1, cores // local - num_workers)
    budget = f"{_plural(affinity, 'core')} in the affinity mask" + (
        f", SLURM_CPUS_PER_TASK={slurm}" if slurm else ""
    )
    budget += f", {_plural(local, 'local process')}, {_plural(num_workers, 'loader worker')}"
    omp = env.get("OMP_NUM_THREADS")
    if requested:
        threads, why = requested, f"train.threads={requested}"
        why += f"; OMP_NUM_THREADS={omp} overridden" if omp else ""
    elif _positive(omp):
        threads, why = _positive(omp), f"OMP_NUM_THREADS={omp} from the environment, kept"
    else:
        threads, why = auto, budget
    if threads != auto:
        why += f"; the cores would give {auto}: {budget}"
    wait_policy, wait_why = _wait_policy(threads, env, bool(requested or _positive(omp)))
    return Threads(threads, why, wait_policy, wait_why)


def _wait_policy(threads: int, env: Mapping[str, str], count_given: bool) -> tuple[str | None, str]:
    given = ", ".join(f"{k}={env[k]}" for k in WAIT_VARS if env.get(k))
    if given and env.get(RESTARTED):
        return None, f"{given} (set before torch loaded OpenMP: the command restarted itself)"
    if given:
        return None, f"{given} from the environment, kept"
    if threads == 1:
        return None, "OpenMP's default wait policy (one thread: no team waits on another)"
    if count_given:
        return None, "OpenMP's default wait policy (a count that was given: its cores spin)"
    return PASSIVE, f"OMP_WAIT_POLICY={PASSIVE}"


def usable_cores() -> int:
    """Cores in this process's affinity mask (all of the machine's where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def for_config(cfg: Config, env: Mapping[str, str] | None = None) -> Threads:
    """The choice for a training process of ``cfg`` on this machine."""
    return choose(
        affinity=usable_cores(),
        num_workers=cfg.data.num_workers,
        requested=cfg.train.threads,
        env=os.environ if env is None else env,
    )


def apply(choice: Threads) -> Threads:
    """Give torch the chosen intra-op threads; the wait policy needs ``restart_for_wait_policy``.
    A policy not set by then is said in the choice's line."""
    torch.set_num_threads(choice.threads)
    if choice.wait_policy is None:
        return choice
    note = f"OMP_WAIT_POLICY={choice.wait_policy} not applied (OpenMP reads it when torch loads)"
    return Threads(choice.threads, choice.why, choice.wait_policy, note)


def use_threads(cfg: Config) -> Threads:
    """Choose and apply; returns the choice (``.line()`` says it)."""
    return apply(for_config(cfg))


def restart_command(
    choice: Threads, env: Mapping[str, str], argv: list[str], executable: str
) -> tuple[str, list[str], dict[str, str]] | None:
    """(executable, argv, environment) that restart this command with the wait policy set,
    or None where there is nothing to set or the command restarted once already."""
    if choice.wait_policy is None or env.get(RESTARTED) or not executable or not argv:
        return None
    new_env = {**env, "OMP_WAIT_POLICY": choice.wait_policy, RESTARTED: "1"}
    return executable, [executable, *argv[1:]], new_env


def restart_for_wait_policy(choice: Threads) -> None:
    """Replace this process by the same command with the wait policy in its environment,
    so libgomp reads it as torch loads; returns only where there is nothing to do (or the
    restart failed, which ``apply`` then says). Call it before any other work."""
    command = restart_command(choice, os.environ, sys.orig_argv, sys.executable)
    if command is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(*command)
    except OSError:
        return
