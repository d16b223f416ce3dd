"""Cross-device negatives are exact: two real gloo processes == one process.

Two CPU processes (``torch.multiprocessing`` spawn, gloo, a free TCP port) each take half
of a fixed global batch, compute the DIM loss through ``DIMObjective`` and backpropagate;
parameter gradients are then averaged across ranks as DDP does (all_reduce sum / world).
For infoNCE, global and local, dot and concat/zz critics, the mean rank loss and the
averaged gradients must equal the loss and gradients of a single process (this pytest
process, no process group) on the concatenated batch; likewise with three views (six
pairs, each view's image side gathered once). JSD and DV must not communicate at all,
and each rank's gradient must equal what that rank computes alone. Controls show
the comparison has teeth: device-only negatives, or a gather that returns gradient to the
local slice alone with the loss scaled by P, miss the reference by > 100x the tolerance.

Why a stand-in encoder: the comparison is exact only if each sample's encoder output
does not depend on which other samples share its device batch. The real encoder breaks
that twice: BatchNorm normalises with per-rank batch statistics, and z draws fresh noise.
So the encoder here is a small deterministic module without BatchNorm, and z uses noise
``eps`` fixed up front and sliced with the batch. Everything after the encoder (critics,
gather, estimators, loss) is the production code. ``tests/test_accelerate_ddp.py`` runs
the real timm model under DDP.
"""

from __future__ import annotations

import datetime
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.nn.functional as dist_fn
import torch.multiprocessing as mp
from torch import nn

import pipeline.objective.loss as objective
from pipeline.core.schema import LossConfig
from pipeline.models.encoder import EncoderOutput
from pipeline.objective import distributed
from pipeline.objective.loss import DIMObjective

pytestmark = pytest.mark.slow  # multi-process
WORLD = 2
B_LOCAL = 4
CHANNELS, CODE_DIM, IMG = 6, 5, 8
ATOL = 1e-5
TIMEOUT_S = 120

# (estimator, global input, global critic, local critic); infoNCE gathers, JSD and DV
# stay on the device.
GATHERING = [
    ("infonce", "pooled", "dot", "none"),
    ("infonce", "pooled", "none", "dot"),
    ("infonce", "mu", "dot", "none"),
    ("infonce", "mu", "concat", "concat"),
    ("infonce", "pooled", "concat", "dot"),
]
MULTI_VIEW = ("infonce", "mu", "concat", "concat")  # run with three views: 6 pairs, 3 gathers
LOCAL_ONLY = [
    ("jsd", "pooled", "dot", "dot"),
    ("jsd", "mu", "concat", "concat"),
    ("dv", "pooled", "dot", "concat"),
]
COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "all_to_all",
    "broadcast",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "gather",
)
FUNCTIONAL_COLLECTIVES = (
    "all_gather_single_autograd",
    "all_gather_tensor",
    "all_gather_tensor_autograd",
    "all_reduce",
    "reduce_scatter_tensor",
    "all_to_all_single",
)


class StandInEncoder(nn.Module):
    """Per-sample deterministic encoder: no BatchNorm, and z from noise given by the caller."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, CHANNELS, 3, stride=2, padding=1)
        self.head = nn.Linear(CHANNELS, 2 * CODE_DIM)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> EncoderOutput:
        local = torch.tanh(self.conv(x))
        pooled = local.mean(dim=(2, 3))
        mu, logvar = self.head(pooled).chunk(2, dim=1)
        z = mu + eps * (0.5 * logvar).exp()
        return EncoderOutput(local, local, pooled, pooled, mu, logvar, z)


def build(case: tuple[str, str, str, str]) -> nn.ModuleDict:
    estimator, global_input, global_critic, local_critic = case
    cfg = LossConfig(
        estimator=estimator,
        global_input=global_input,
        global_critic=global_critic,
        local_critic=local_critic,
        alpha=0.5,  # both terms and the prior weigh in (not the DIM(L) defaults)
        gamma=0.1,
        critic_dim=8,
        critic_hidden=16,
    )
    torch.manual_seed(0)
    return nn.ModuleDict(
        {"encoder": StandInEncoder(), "objective": DIMObjective(cfg, CHANNELS, CODE_DIM)}
    )


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD * B_LOCAL, 3, IMG, IMG, generator=gen)
    eps = torch.randn(WORLD * B_LOCAL, CODE_DIM, generator=gen)
    return images, eps


def run_case(case, rows: slice, seed: int = 0, scale: float = 1.0, views: int = 1) -> dict:
    """Loss, logged terms and parameter gradients for the batch rows ``rows``; with
    ``views`` > 1, per-sample distinct views (shifted images and noise)."""
    model = build(case)
    images, eps = global_batch()
    outs = [
        model["encoder"](images[rows].roll(2 * v, dims=-1), eps[rows].roll(v, dims=-1))
        for v in range(views)
    ]
    loss, terms = model["objective"](*outs, generator=torch.Generator().manual_seed(seed))
    (scale * loss).backward()
    grads = {
        n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in model.named_parameters()
    }
    return {"loss": loss.detach(), "terms": terms, "grads": grads}


@contextmanager
def no_communication():
    """Make every collective raise: the code inside must not talk to other ranks."""

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"unexpected cross-device collective {name}()")

        return call

    # The functional collectives (funcol) bypass torch.distributed's Python API, and
    # pipeline.objective.distributed holds its all-gather in _ALL_GATHER: patch those too.
    targets = [(m, name) for m in (dist, dist.distributed_c10d, dist_fn) for name in COLLECTIVES]
    targets += [(funcol, name) for name in FUNCTIONAL_COLLECTIVES]
    if distributed._ALL_GATHER is not None:
        targets.append((distributed, "_ALL_GATHER"))
    saved = []
    for module, name in targets:
        if hasattr(module, name):
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, forbidden(name))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def _local_slice_gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather whose gradient reaches the local slice only (the common shortcut)."""
    parts = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


@contextmanager
def swapped_gather(gather, rank=objective.rank):
    """Run the objective with another gather: the controls that must give other gradients."""
    saved = objective.gather_with_grad, objective.rank
    objective.gather_with_grad, objective.rank = gather, rank
    try:
        yield
    finally:
        objective.gather_with_grad, objective.rank = saved


CONTROLS = {  # name -> (gather, rank, loss scale)
    "device negatives": (lambda x: x, lambda: 0, 1.0),
    "local-slice gather x P": (_local_slice_gather, objective.rank, float(WORLD)),
}


# ----------------------------------------------------------------------- the workers


def _check_gather(rank: int) -> dict:
    """gather_with_grad: rank order forward, gradient of every rank's loss summed back."""
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    y = distributed.gather_with_grad(x)
    weights = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape) * (rank + 1)
    (y * weights).sum().backward()
    return {"gathered": y.detach(), "grad": x.grad.clone()}


def _rank_mean(res: dict) -> dict:
    """Average loss and gradients across ranks in place, as DDP does for gradients."""
    for tensor in [res["loss"], *res["grads"].values()]:
        dist.all_reduce(tensor)
        tensor /= WORLD
    return res


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        assert dist.get_world_size() == WORLD and distributed.world_size() == WORLD
        assert distributed.rank() == rank and distributed.is_distributed()
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        results = {"world_size": dist.get_world_size(), "gather": _check_gather(rank)}
        for case in GATHERING:
            results[case] = _rank_mean(run_case(case, rows))
            for name, (gather, rank_fn, scale) in CONTROLS.items():
                with swapped_gather(gather, rank_fn):
                    results[case, name] = _rank_mean(run_case(case, rows, scale=scale))
        results["views", MULTI_VIEW] = _rank_mean(run_case(MULTI_VIEW, rows, views=3))
        for case in LOCAL_ONLY:
            with no_communication():
                results[case] = run_case(case, rows, seed=rank)
        with no_communication():  # the guard must catch the gather infoNCE does use
            try:
                run_case(GATHERING[0], rows)
                results["guard"] = None
            except AssertionError as err:
                results["guard"] = str(err)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Start the two workers once; a worker's exception fails the test with its traceback."""
    out_dir = tmp_path_factory.mktemp("dist")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned children
        ctx = mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S}s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name],
            want[name],
            atol=ATOL,
            rtol=0,
            msg=lambda m, name=name: f"gradient of {name}: {m}",
        )


# ------------------------------------------------------------------------ the checks


def test_workers_saw_world_size_two(ranks):
    assert [r["world_size"] for r in ranks] == [WORLD] * WORLD


def test_gather_with_grad_orders_by_rank_and_sums_gradients(ranks):
    want_y = torch.cat([torch.full((2, 3), float(r + 1)) for r in range(WORLD)])
    base = torch.arange(want_y.numel(), dtype=torch.float32).reshape(want_y.shape)
    summed = base * sum(r + 1 for r in range(WORLD))  # d/dy of sum over ranks' losses
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["gather"]["gathered"], want_y)
        torch.testing.assert_close(res["gather"]["grad"], summed[2 * r : 2 * r + 2])


@pytest.mark.parametrize("case", GATHERING, ids="-".join)
def test_infonce_across_ranks_equals_one_process(ranks, case):
    want = run_case(case, slice(None))
    assert any(g.abs().max() > 1e-3 for g in want["grads"].values())
    for res in ranks:
        torch.testing.assert_close(res[case]["loss"], want["loss"], atol=ATOL, rtol=0)
        assert_grads_close(res[case]["grads"], want["grads"])
    for key in ("loss/global", "loss/local", "kl"):
        if key in want["terms"]:
            got = sum(r[case]["terms"][key] for r in ranks) / WORLD
            torch.testing.assert_close(
                got,
                want["terms"][key],
                atol=ATOL,
                rtol=0,
                msg=lambda m, key=key: f"term {key}: {m}",
            )


def test_three_views_across_ranks_equal_one_process(ranks):
    """Each view's image side is gathered once and scored by the two other views' codes:
    the gathered tensor's gradient must still reach every rank from every pair."""
    want = run_case(MULTI_VIEW, slice(None), views=3)
    assert (want["loss"] - run_case(MULTI_VIEW, slice(None))["loss"]).abs() > 1e-3
    for res in ranks:
        torch.testing.assert_close(
            res["views", MULTI_VIEW]["loss"], want["loss"], atol=ATOL, rtol=0
        )
        assert_grads_close(res["views", MULTI_VIEW]["grads"], want["grads"])


@pytest.mark.parametrize("control", CONTROLS)
@pytest.mark.parametrize("case", GATHERING, ids="-".join)
def test_wrong_negatives_or_scaling_would_be_caught(ranks, case, control):
    """Controls: negatives from the device batch only, or a gather that returns gradient
    to the local slice alone with the loss scaled by P, move the averaged gradients by far
    more than the tolerance, so the equality above has teeth and no rescaling can stand in
    for the autograd gather."""
    want = run_case(case, slice(None))["grads"]
    wrong = ranks[0][case, control]["grads"]
    assert max((wrong[n] - want[n]).abs().max() for n in want) > 100 * ATOL


@pytest.mark.parametrize("case", LOCAL_ONLY, ids="-".join)
def test_local_negatives_never_communicate(ranks, case):
    """The workers ran these with every collective patched to raise; compare to alone."""
    for r, res in enumerate(ranks):
        want = run_case(case, slice(r * B_LOCAL, (r + 1) * B_LOCAL), seed=r)
        torch.testing.assert_close(res[case]["loss"], want["loss"], atol=ATOL, rtol=0)
        assert_grads_close(res[case]["grads"], want["grads"])
    assert not torch.allclose(ranks[0][case]["loss"], ranks[1][case]["loss"])


def test_the_no_communication_guard_catches_the_gather_infonce_uses(ranks):
    """Without this, the test above could pass with a guard that patched nothing used."""
    for res in ranks:
        assert res["guard"] is not None and "cross-device collective" in res["guard"]
