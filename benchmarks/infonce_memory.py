"""Memory and time of one rank's infoNCE score step: B_local x B_global rows vs B_global^2.

With P ranks of B_local images each (B_global = P * B_local), cross-device infoNCE has
every rank score its own B_local codes against all B_global gathered image embeddings;
the alternative of building the full B_global x B_global matrix on every rank costs
B_global^2 (and, for local critics, B_global^2 * h * w) scores. This script runs what
one rank runs, for global and local dot critics, in both formulations: the production
``pipeline.objective.mi_estimate`` on embeddings that are already computed (so only the
score step is measured: pairwise scores, soft clip, infoNCE, backward), with the
all-gather replaced by a concatenation with the other ranks' embeddings.

How memory is measured (CPU): torch's CPU tensors are plain malloc'd buffers, invisible
to tracemalloc, and torch.cuda.max_memory_allocated has no CPU twin. So each
configuration runs in a fresh subprocess that reads the process's peak resident set
(``getrusage(...).ru_maxrss``) just before the step, with the inputs allocated, and
just after the first forward+backward: the difference is the step's real peak extra
memory (scores, their clipped copies, the masked negatives, gradients), allocator
overhead included. The subprocess runs with a fixed glibc mmap threshold
(``MALLOC_MMAP_THRESHOLD_``), so every large buffer is its own mapping and goes back to
the OS when freed: the resident peak then follows the live tensors instead of heap
reuse, which otherwise varies from run to run. A second number comes from autograd itself:
the bytes of the distinct tensors saved for backward (``torch.autograd.graph.saved_tensors_hooks``).
Time is the best of a few further forward+backward passes (the least disturbed by
whatever else runs on the machine).

    .venv/bin/python benchmarks/infonce_memory.py            # markdown table on stdout
    .venv/bin/python benchmarks/infonce_memory.py --b-local 128 --sizes 128,1024
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pipeline.core.cli import comma_separated, exit_on_mistake

MIB = 2**20
DIM = 256  # critic embedding size (LossConfig.critic_dim default)
LOCATIONS = 64  # an 8x8 local map (resnet stage 1 at 32x32 input)
TCLIP = 20.0  # LossConfig.tclip default


def _precomputed_critic(local: bool):
    """A dot critic whose inputs are already its embeddings, so only scoring runs."""
    from pipeline.objective.critics import DotCritic

    class Precomputed(DotCritic):
        def embed_a(self, a):
            return a

        def embed_b(self, b):
            return b

    return Precomputed(1, 1, dim=1, hidden=1, local=local)


@contextmanager
def _gather_from(remote: torch.Tensor):
    """Stand in for the all-gather: this rank's rows first, the other ranks' after."""
    import pipeline.objective.loss as objective

    saved = objective.gather_with_grad
    objective.gather_with_grad = lambda ea: torch.cat([ea, remote])
    try:
        yield
    finally:
        objective.gather_with_grad = saved


def _saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``step`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(storages.values())


def run_one(critic: str, mode: str, b_global: int, b_local: int, repeats: int) -> dict:
    """One configuration; meant to run alone in a fresh process (see ``main``)."""
    from pipeline.objective.loss import mi_estimate

    local = critic == "local"
    rows = b_local if mode == "rows" else b_global
    shape = (LOCATIONS, DIM) if local else (DIM,)
    gen = torch.Generator().manual_seed(0)
    leaf = lambda n, *s: torch.randn(n, *s, generator=gen).requires_grad_()  # noqa: E731
    a, b = leaf(rows, *shape), leaf(rows, DIM)
    remote = leaf(b_global - rows, *shape)
    model = _precomputed_critic(local)

    def step() -> torch.Tensor:
        with _gather_from(remote):
            bound = mi_estimate("infonce", model, a, b, tclip=TCLIP).bound
        return -bound

    tiny = _precomputed_critic(local)  # load kernels and libraries before measuring
    with _gather_from(remote[:2]):
        (-mi_estimate("infonce", tiny, a[:2], b[:2], tclip=TCLIP).bound).backward()
    a.grad = b.grad = remote.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    saved = _saved_bytes(step)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step().backward()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak * 1024 / MIB, "saved_mib": saved / MIB, "ms": 1000 * min(times)}


def score_mib(critic: str, rows: int, b_global: int) -> float:
    return rows * b_global * (LOCATIONS if critic == "local" else 1) * 4 / MIB


def measure(critic: str, mode: str, b_global: int, args) -> dict | None:
    rows = args.b_local if mode == "rows" else b_global
    if score_mib(critic, rows, b_global) > args.max_score_mib:
        return None
    cmd = [
        sys.executable,
        __file__,
        "--one",
        critic,
        mode,
        str(b_global),
        "--b-local",
        str(args.b_local),
        "--repeats",
        str(args.repeats),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(res: dict | None) -> str:
    if res is None:
        return "skipped | | "
    return f"{res['peak_mib']:.1f} | {res['saved_mib']:.1f} | {res['ms']:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--b-local", type=int, default=256)
    parser.add_argument("--sizes", type=comma_separated(int), default="256,512,1024,2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (1: stable timings on a shared machine)",
    )
    parser.add_argument(
        "--max-score-mib",
        type=float,
        default=1024,
        help="skip configurations whose score tensor alone is larger",
    )
    parser.add_argument(
        "--one", nargs=3, metavar=("CRITIC", "MODE", "B_GLOBAL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.one:
        critic, mode, b_global = args.one
        print(json.dumps(run_one(critic, mode, int(b_global), args.b_local, args.repeats)))
        return

    print(
        f"B_local = {args.b_local} per rank, P = B_global / B_local ranks; dot critic, "
        f"D = {DIM}, local map {LOCATIONS} locations; torch {torch.__version__}, "
        f"{args.threads} thread(s). Memory in MiB, time in ms (forward+backward).\n"
    )
    print(
        "| critic | B_global | P | scores/rank rows | peak rows | saved rows | ms rows "
        "| scores/rank full | peak full | saved full | ms full |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for critic in ("global", "local"):
        for b_global in args.sizes:
            rows = measure(critic, "rows", b_global, args)
            full = measure(critic, "full", b_global, args)
            print(
                f"| {critic} | {b_global} | {b_global // args.b_local} "
                f"| {score_mib(critic, args.b_local, b_global):.1f} | {_cell(rows)} "
                f"| {score_mib(critic, b_global, b_global):.1f} | {_cell(full)} |",
                flush=True,
            )


if __name__ == "__main__":
    exit_on_mistake("infonce_memory.py", main)
