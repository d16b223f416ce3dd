"""A short run of the DIM objective on real images (digits), printing MI estimates.

``python -m pipeline.demo`` needs no shards, no accelerate and no network: it shows
the objective at work in a minute on a CPU.
"""

from __future__ import annotations

import argparse

import torch

from .config import load_config
from .digits import digits_tensor
from .model import build_model

LR = 1e-3
SEED = 0


def run_objective(
    overrides: list[str],
    steps: int = 200,
    batch: int = 64,
    *,
    pool: int = 512,
    log_every: int = 20,
    verbose: bool = True,
) -> list[dict[str, float]]:
    """Train encoder + critics on ``pool`` digits for ``steps`` steps; return the log
    (a row every ``log_every`` steps, printed with ``verbose``)."""
    torch.manual_seed(SEED)
    cfg = load_config(None, overrides)
    model = build_model(cfg)
    images, _ = digits_tensor(cfg.model.img_size, limit=pool)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(SEED)
    history = []
    for step in range(steps + 1):
        idx = torch.randperm(len(images), generator=gen)[:batch]
        x = images[idx]
        x = x + 0.05 * torch.randn(x.shape, generator=gen)  # a light augmentation
        loss, terms = model(x, generator=gen)
        if step % log_every == 0 or step == steps:
            row = {"step": step, **{k: float(v) for k, v in terms.items()}}
            history.append(row)
            if verbose:
                mi = "  ".join(f"{k}={v:+.3f}" for k, v in row.items() if k.startswith("mi/"))
                print(
                    f"step {step:4d}  loss={row['loss']:+.3f}  {mi}  kl={row['kl']:.2f}", flush=True
                )
        if step < steps:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return history


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. loss.estimator=jsd")
    args = p.parse_args(argv)
    overrides = ["model.backbone=resnet18", *args.overrides]
    run_objective(overrides, steps=args.steps, batch=args.batch)


if __name__ == "__main__":
    main()
