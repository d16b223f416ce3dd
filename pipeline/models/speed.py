"""Step-speed options: ``train.channels_last``, ``train.compile``,
``train.keep_freed_memory`` and what ``train.mixed_precision=auto`` resolves to.

They change how the step runs, never what it computes. ``nn.Module.compile()`` compiles
in place, so parameter names, checkpoints and the exported encoder are the same as
without it (``torch.compile(module)`` would wrap it and prefix every key with
``_orig_mod.``). The encoder and the objective (critics + estimators) are compiled
separately: the cross-device gather inside the objective is a graph break, and the
encoder is where almost all of the time goes.
"""

from __future__ import annotations

import ctypes
import sys

import torch
from torch import nn

from pipeline.core.schema import TrainConfig

__all__ = [
    "apply_speed_options",
    "in_model_layout",
    "keep_freed_memory",
    "native_bf16",
    "precision_name",
    "resolve_precision",
]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_KEEP_BELOW = 2**31 - 1  # bytes: allocations up to 2 GiB come from the heap and stay there


def keep_freed_memory(enabled: bool = True) -> bool:
    """Make glibc's malloc keep freed memory for the next step instead of returning it.

    By default glibc gives each large allocation its own mmap, unmaps it when it is
    freed, and trims the top of the heap. A training step frees its activations and
    allocates the same sizes again on the next step, so on a CPU every step pays the
    kernel to map and zero those pages again: about 10% of a ResNet-50 step at 224 px on
    the development machine, and more of a DIM step, whose critics add large temporaries
    (docs/training.md, "Step speed"). With both thresholds raised, freed memory stays in
    the heap for reuse; the process keeps its peak resident size until it exits.
    Process-wide and irreversible; forked loader workers inherit it. Returns whether it
    was applied (Linux with glibc; elsewhere a no-op).
    """
    if not enabled or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl): leave it alone
        return False
    limit = ctypes.c_int(_KEEP_BELOW)
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


def native_bf16(cuda: bool) -> bool:
    """Whether the device computes bf16 in hardware: a GPU that supports it, or a CPU
    whose oneDNN has bf16 kernels (AVX512-BF16 or AMX). Elsewhere torch emulates bf16 on
    the CPU, slower than fp32."""
    if cuda:
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precision_name(choice: str) -> str:
    """A precision as people say it: accelerate's "no" is fp32."""
    return "fp32" if choice == "no" else choice


def resolve_precision(choice: str, cuda: bool | None = None) -> tuple[str, str]:
    """``train.mixed_precision`` as accelerate takes it, and the start line's words for it.

    ``auto`` is bf16 where the device computes it natively, else no: 1.43x the fp32
    step rate of ``configs/cifar10_cpu.yaml`` on a 2-core AVX512-BF16 CPU
    (docs/results.md, "Twice the budget"). An explicit bf16 on a CPU without it is kept,
    with a warning, since it runs slower than fp32 there.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    device = "GPU" if cuda else "CPU"
    if choice == "auto":
        if native_bf16(cuda):
            return "bf16", f"precision: bf16 (auto: this {device} computes bf16 natively)"
        return "no", f"precision: fp32 (auto: this {device} has no native bf16)"
    if choice == "bf16" and not native_bf16(cuda):
        return "bf16", (
            f"precision: bf16 (warning: this {device} has no native bf16; it is emulated, "
            f"slower than fp32)"
        )
    return choice, f"precision: {precision_name(choice)}"


def apply_speed_options(
    model: nn.Module, cfg: TrainConfig, *, backend: str = "inductor"
) -> nn.Module:
    """Apply the options to a DIM model (in place); returns it for chaining. ``backend``
    is torch.compile's (tests pass "eager": the same tracing without the C++ build)."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        for part in (model.encoder, model.objective):
            part.compile(backend=backend)
    return model


def in_model_layout(images: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Images in the memory layout ``apply_speed_options`` gave the model."""
    if not cfg.channels_last:
        return images
    return images.contiguous(memory_format=torch.channels_last)
