"""The machine section: versions, devices, cores, bf16, load, and the training threads."""

from __future__ import annotations

import importlib.metadata
import os

import torch
import torch.distributed as dist

from pipeline.core.schema import Config
from pipeline.doctor.row import Row
from pipeline.train.threads import LOCAL_PROCESS_VARS, for_config, usable_cores


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_devices() -> int:
    """Training processes this node runs: one per GPU, or one on a CPU-only node."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nccl_version() -> str | None:
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        return None
    return ".".join(map(str, torch.cuda.nccl.version()))


def _devices() -> str:
    if not torch.cuda.is_available():
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return f"cpu only, {ram / 2**30:.0f} GiB RAM"
    return "; ".join(
        f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB"
        for i, p in ((i, torch.cuda.get_device_properties(i)) for i in range(local_devices()))
    )


def bf16_support() -> tuple[bool, str]:
    """(supported, how it was found): CUDA's own answer, or a bf16 autocast tried on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(), "torch.cuda.is_bf16_supported()"
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.ones(4, 4) @ torch.ones(4, 4)
    except RuntimeError as err:
        return False, f"torch.autocast('cpu', bfloat16) failed: {err}"
    return out.dtype == torch.bfloat16, f"torch.autocast('cpu', bfloat16) gives {out.dtype}"


def machine_rows() -> list[Row]:
    cores = usable_cores()
    load = os.getloadavg()[0]
    bf16, how = bf16_support()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    facts = {
        "torch": torch.__version__,
        "CUDA": torch.version.cuda,
        "NCCL": _nccl_version(),
        "cuDNN": cudnn,
        "devices": _devices(),
        "accelerate": package_version("accelerate"),
        "deepspeed": package_version("deepspeed"),
    }
    rows = [Row("machine", name, str(value)) for name, value in facts.items()]
    rows.append(Row("machine", "CPU cores usable", f"{cores} (affinity mask)", cores, "cores"))
    rows.append(Row("machine", "bf16", str(bf16), status="pass" if bf16 else "skip", reason=how))
    busy = load > cores * 0.5
    rows.append(
        Row(
            "machine",
            "load average (1 min)",
            f"{load:.2f}",
            load,
            status="warn" if busy else "pass",
            reason=(
                f"already loaded (> {cores} cores x 0.5): speed figures will be low"
                if busy
                else f"<= {cores} cores x 0.5"
            ),
        )
    )
    return rows


def threads_row(cfg: Config) -> Row:
    """The CPU threads a training process of ``cfg`` will take here (``pipeline.train.threads``),
    for one process per device where no launcher says how many run on this node."""
    env = dict(os.environ)
    if not any(env.get(k) for k in LOCAL_PROCESS_VARS):
        env["LOCAL_WORLD_SIZE"] = str(local_devices())
    choice = for_config(cfg, env)
    return Row(
        "machine",
        "training threads per process",
        f"{choice.threads} intra-op",
        choice.threads,
        "threads",
        "info",
        f"{choice.why}; {choice.wait_why}",
    )
