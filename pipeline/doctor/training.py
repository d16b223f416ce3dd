"""Correctness of one training step: bf16 against fp32, and a checkpoint's resume."""

from __future__ import annotations

import math
import tempfile

import torch

from pipeline.core.schema import Config
from pipeline.data.augment import view_count
from pipeline.doctor.machine import bf16_support, device_type
from pipeline.doctor.row import Row
from pipeline.objective.model import DIM, build_model
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint

# Resumed weights must be bit-identical; the next steps' losses too on CPU, but on a GPU
# the backward's atomic adds make a step itself vary in the last bits (1.9e-9 on an H200),
# while a resume that lost the optimizer's state moves the second loss by 7e-4 (this config).
RESUME_ATOL = {"cpu": 0.0, "cuda": 1e-6}
BF16_MIN_COSINE = 0.99  # bf16 keeps 8 bits of mantissa: ~0.4% per value
BF16_BATCH = 16


def random_images(cfg: Config, batch: int, seed: int, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    return torch.rand(shape, generator=gen).mul(2).sub(1).to(device)


def _views(cfg: Config, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The model's arguments: the images once per view ``data`` asks for."""
    return (images,) * view_count(cfg.data)


def _seeded_loss(model: DIM, cfg: Config, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The DIM loss with z's noise drawn from ``seed``: two calls see the same noise."""
    torch.manual_seed(seed)
    loss, _ = model(*_views(cfg, images))
    return loss


def _loss_and_gradient(
    model: DIM, cfg: Config, images: torch.Tensor, dtype: torch.dtype | None
) -> tuple[float, torch.Tensor]:
    """One seeded forward + backward, in fp32 or under autocast to ``dtype``: the loss and
    every parameter's gradient as one flat fp32 vector (gradients are cleared after)."""
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
        loss = _seeded_loss(model, cfg, images)
    loss.backward()
    grads = [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return loss.item(), torch.cat(grads)


def bf16_row(cfg: Config) -> Row:
    """The gradient a bf16 step follows against fp32's, by cosine: the loss itself can sit
    near zero (infoNCE at init), where a relative difference of losses means nothing."""
    device = device_type()
    supported, how = bf16_support()
    check = "one bf16 DIM step: finite, close to fp32"
    if not supported:
        return Row("correctness", check, "not run", status="skip", reason=how)
    model = build_model(cfg).to(device).train()
    images = random_images(cfg, BF16_BATCH, seed=2, device=device)
    fp32, g32 = _loss_and_gradient(model, cfg, images, None)
    low, g16 = _loss_and_gradient(model, cfg, images, torch.bfloat16)
    finite = math.isfinite(low) and bool(torch.isfinite(g16).all())
    cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item() if finite else 0.0
    return Row(
        "correctness",
        check,
        f"loss fp32 {fp32:.4f}, bf16 {low:.4f}; gradients finite: {finite}",
        cosine,
        "cosine",
        "pass" if finite and cosine >= BF16_MIN_COSINE else "fail",
        f"gradient cosine bf16 vs fp32 >= {BF16_MIN_COSINE}; batch {BF16_BATCH}, {device} autocast",
    )


def _accelerated(cfg: Config):
    """A fresh Accelerator with a fresh model and AdamW prepared (same initial weights)."""
    from accelerate import Accelerator  # heavy: imported only where a check needs it

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    return (accelerator, *accelerator.prepare(model, opt))


def _train_step(model, opt, cfg: Config, images: torch.Tensor) -> float:
    loss = _seeded_loss(model, cfg, images.to(next(model.parameters()).device))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _next_two(model, opt, cfg: Config, batches: list[torch.Tensor]) -> list[float]:
    """The loss of one more training step, and of the forward after it: the first depends
    on the weights alone, the second on the optimizer's state too."""
    first = _train_step(model, opt, cfg, batches[1])
    with torch.no_grad():
        second = _seeded_loss(model, cfg, batches[2].to(next(model.parameters()).device))
    return [first, second.item()]


def checkpoint_row(cfg: Config) -> Row:
    batch = min(cfg.train.batch_size, BF16_BATCH)
    batches = [random_images(cfg, batch, seed=10 + i) for i in range(3)]
    accelerator, model, opt = _accelerated(cfg)
    _train_step(model, opt, cfg, batches[0])
    with tempfile.TemporaryDirectory(prefix="dim-doctor-") as out:
        path = save_checkpoint(accelerator, out, 1, {"samples_seen": batch}, keep_last=1)
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        original = _next_two(model, opt, cfg, batches)
        accelerator2, fresh, fresh_opt = _accelerated(cfg)
        _train_step(fresh, fresh_opt, cfg, batches[2])  # moved away from the saved state
        load_checkpoint(accelerator2, path)
    weights = max(
        (fresh.state_dict()[k].float() - v.float()).abs().max().item() for k, v in saved.items()
    )
    resumed = _next_two(fresh, fresh_opt, cfg, batches)
    loss_diff = max(abs(a - b) for a, b in zip(original, resumed, strict=True))
    tolerance = RESUME_ATOL[device_type()]
    ok = weights == 0 and loss_diff <= tolerance
    return Row(
        "correctness",
        "checkpoint saves and resumes",
        f"weights max abs diff {weights:.1e}; next steps' losses "
        f"{', '.join(f'{v:.6f}' for v in original)} vs {', '.join(f'{v:.6f}' for v in resumed)}",
        loss_diff,
        "abs",
        "pass" if ok else "fail",
        f"weights bit-identical, losses within {tolerance:g}"
        f"{' (cuDNN backward kernels add in any order)' if tolerance else ''}; "
        "save_checkpoint / load_checkpoint through accelerate",
    )
