"""Helper for tests/test_accelerate_ddp.py: a real DIM model under accelerate + DDP.

Run as ``accelerate launch --config_file launch/cpu.yaml --num_processes 2
tests/ddp_worker.py OUT_DIR``. Each rank:

1. checks it is one of two gloo processes and that the model is DDP-wrapped;
2. step 0 in eval mode, where the encoder is batch-independent (BatchNorm uses its
   running statistics, z = mu): one backward through DDP on its half of a fixed global
   batch. Rank 0 saves the initial weights, the global batch and the DDP-averaged
   gradients, so the test can compare them with one process on the whole batch;
3. a few AdamW steps in train mode on different data per rank, then gathers a
   per-parameter checksum from every rank: DDP must keep the replicas identical.

Rank 0 writes ``OUT_DIR/result.json`` (and ``step0.pt``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import load_config
from pipeline.objective import distributed
from pipeline.objective.model import build_model

WORLD, B_LOCAL, STEPS = 2, 4, 3
OVERRIDES = [
    "model.backbone=test_resnet",
    "model.img_size=32",
    "model.code_dim=16",
    "model.fc_dim=32",
    "loss.critic_dim=16",
    "loss.critic_hidden=32",
    "loss.estimator=infonce",
    "loss.global_critic=dot",
    "loss.local_critic=dot",
]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(None, OVERRIDES))


def step0_batch() -> torch.Tensor:
    return torch.randn(WORLD * B_LOCAL, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    assert accelerator.num_processes == WORLD, accelerator.num_processes
    assert dist.get_world_size() == WORLD and distributed.world_size() == WORLD
    assert dist.get_backend() == "gloo", dist.get_backend()

    model = make_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert isinstance(model, DistributedDataParallel), type(model)

    model.eval()
    images = step0_batch()[rank * B_LOCAL : (rank + 1) * B_LOCAL]
    loss, _ = model(images)
    accelerator.backward(loss)
    step0 = {
        "loss": accelerator.reduce(loss.detach(), "mean"),
        "grads": {n: p.grad.clone() for n, p in accelerator.unwrap_model(model).named_parameters()},
    }
    optimizer.zero_grad()

    model.train()
    losses = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(100 * step + rank)  # each rank its own data
        loss, _ = model(torch.randn(B_LOCAL, 3, 32, 32, generator=gen))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())

    params = dict(accelerator.unwrap_model(model).named_parameters())
    sums = torch.stack([p.detach().double().sum() for p in params.values()])
    all_sums = accelerator.gather(sums.unsqueeze(0))  # (WORLD, n_params)
    if accelerator.is_main_process:
        torch.save({"initial": initial, "images": step0_batch(), **step0}, out_dir / "step0.pt")
        result = {
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "distributed_type": str(accelerator.distributed_type),
            "rank_checksums": all_sums.tolist(),
            "max_rank_difference": (all_sums - all_sums[0]).abs().max().item(),
            "max_change_from_init": max(
                (p.detach() - initial[n]).abs().max().item() for n, p in params.items()
            ),
            "losses": losses,
        }
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
