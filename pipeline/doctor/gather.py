"""Correctness across processes: the infoNCE gather of N processes equals one process.

A tiny encoder whose samples are independent (no BatchNorm) is run on the whole batch in
one process and on its slices in N, with negatives gathered and gradients averaged as DDP
does; loss and every gradient must agree."""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.core.schema import LossConfig
from pipeline.doctor.row import Row
from pipeline.models.encoder import EncoderOutput
from pipeline.objective.loss import DIMObjective

GATHER_LOCAL_BATCH = 4
GATHER_ATOL = {"cpu": 1e-5, "cuda": 1e-4}  # fp32 sums in another order; TF32 off on GPU
SPAWN_TIMEOUT_S = 120


class _TinyEncoder(nn.Module):
    """Each sample's output depends on that sample alone (no BatchNorm, z = mu), so that
    splitting the batch over processes can change nothing but the negatives."""

    channels, code_dim = 6, 5

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, self.channels, 3, stride=2, padding=1)
        self.head = nn.Linear(self.channels, 2 * self.code_dim)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        local = torch.tanh(self.conv(x))
        pooled = local.mean(dim=(2, 3))
        mu, logvar = self.head(pooled).chunk(2, dim=1)
        return EncoderOutput(local, local, pooled, pooled, mu, logvar, mu)


def _gather_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    loss = LossConfig(estimator="infonce", critic_dim=8, critic_hidden=16)
    objective = DIMObjective(loss, _TinyEncoder.channels, _TinyEncoder.code_dim)
    return nn.ModuleDict({"encoder": _TinyEncoder(), "objective": objective}).to(device)


def _gather_batch(world: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(world * GATHER_LOCAL_BATCH, 3, 8, 8, generator=gen).to(device)


def _loss_and_grads(device: str, world: int, rows: slice) -> list[torch.Tensor]:
    """[loss, *parameter gradients] of the infoNCE objective on ``rows`` of the batch."""
    model = _gather_model(device)
    loss, _ = model["objective"](model["encoder"](_gather_batch(world, device)[rows]))
    loss.backward()
    return [loss.detach(), *(p.grad.detach().clone() for p in model.parameters())]


def _gather_worker(rank: int, world: int, backend: str, out: str) -> None:
    """One rank: its slice of the batch, negatives gathered from every rank, then loss and
    gradients averaged over ranks as DDP does; rank 0 saves them."""
    torch.set_num_threads(1)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group(
        backend,
        init_method=f"file://{Path(out) / 'rendezvous'}",  # no port to pick or race for
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=SPAWN_TIMEOUT_S),
    )
    try:
        rows = slice(rank * GATHER_LOCAL_BATCH, (rank + 1) * GATHER_LOCAL_BATCH)
        tensors = _loss_and_grads(device, world, rows)
        for t in tensors:
            dist.all_reduce(t)
            t /= world
        if rank == 0:
            torch.save([t.cpu() for t in tensors], Path(out) / "rank0.pt")
    finally:
        dist.destroy_process_group()


def _gather_setup() -> tuple[str, int, str]:
    """(backend, world size, what the row says about the choice)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= 2 and dist.is_nccl_available():
        return "nccl", gpus, f"NCCL, one process per GPU ({gpus})"
    if gpus == 1:
        return "gloo", 2, "one GPU: the cross-device check needs 2; ran on 2 gloo CPU processes"
    return "gloo", 2, "no GPU: 2 gloo CPU processes"


def gather_row() -> Row:
    backend, world, how = _gather_setup()
    device = "cuda" if backend == "nccl" else "cpu"
    atol = GATHER_ATOL[device]
    with tempfile.TemporaryDirectory(prefix="dim-doctor-") as out, _env(OMP_NUM_THREADS="1"):
        ctx = mp.spawn(_gather_worker, args=(world, backend, out), nprocs=world, join=False)
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"the {world} {backend} processes took > {SPAWN_TIMEOUT_S} s")
        ranks = torch.load(Path(out) / "rank0.pt")
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
    one = [t.cpu() for t in _loss_and_grads(device, world, slice(None))]
    diff = max((a - b).abs().max().item() for a, b in zip(ranks, one, strict=True))
    return Row(
        "correctness",
        f"gather_with_grad: {world} processes == 1 (loss, gradients)",
        f"max abs diff {diff:.1e}",
        diff,
        status="pass" if diff <= atol else "fail",
        reason=f"tolerance {atol:.0e}; {how}",
    )


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables set for the block (spawned children inherit them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
