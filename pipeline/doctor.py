"""``python -m pipeline.doctor`` / ``dim-doctor``: does this node work, and what will limit it?

``python -m pipeline.doctor [--config FILE] [key=value ...] [--json FILE] [--deepspeed]``
takes the configuration as ``pretrain.py`` does and prints one table in three sections:

- machine: versions, devices, usable cores, bf16 support, a warning when already loaded,
  the CPU threads a training process of the configuration will take;
- correctness on these devices: the infoNCE gather across processes equals one process
  (NCCL, one process per GPU, with two GPUs or more; otherwise two gloo processes on the
  CPU, said in the row), one bf16 step is finite and close to fp32, a checkpoint saves and
  resumes to the same next steps, DeepSpeed ZeRO-2 trains two steps (``--deepspeed``;
  on by default where a GPU exists, since on CPU it takes about a minute);
- speed for the configuration: the DIM step against its bare backbone, ``pretrain.py``
  itself for about ten seconds (on a GPU the loop around the step cost 1.6x the step),
  the input pipeline's images/s per loader worker on the configuration's own shards, and
  what follows: workers per device, whether the cores can feed the devices, epoch and
  run time on 1, 8 and 64 nodes, and the bytes the infoNCE all-gather moves per step.

Each figure is measured here, on this node, in this run, except the scaled times, which
assume linear scaling (and say so). Exit code 0 when nothing failed, 1 when a check
failed, 2 (with one line on stderr) for a mistake in the input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.core.files import METRICS, human_bytes
from pipeline.core.schema import Config, LossConfig
from pipeline.data.augment import view_count
from pipeline.data.batch_augment import build_batch_augment
from pipeline.data.loaders import train_loader
from pipeline.data.shards import dataset_size
from pipeline.data.write import prepare_digits
from pipeline.models.encoder import EncoderOutput, create_backbone
from pipeline.models.speed import apply_speed_options, in_model_layout, resolve_precision
from pipeline.objective.loss import GLOBAL_INPUTS, DIMObjective
from pipeline.objective.model import DIM, build_model
from pipeline.share.tracking import read_metrics
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.threads import LOCAL_PROCESS_VARS, for_config, usable_cores

__all__ = ["Row", "main", "run_checks"]

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("pass", "fail", "skip", "warn", "info")
NODES = (1, 8, 64)
GATHER_LOCAL_BATCH = 4
GATHER_ATOL = {"cpu": 1e-5, "cuda": 1e-4}  # fp32 sums in another order; TF32 off on GPU
# Resumed weights must be bit-identical; the next steps' losses too on CPU, but on a GPU
# the backward's atomic adds make a step itself vary in the last bits (1.9e-9 on an H200),
# while a resume that lost the optimizer's state moves the second loss by 7e-4 (this config).
RESUME_ATOL = {"cpu": 0.0, "cuda": 1e-6}
BF16_MIN_COSINE = 0.99  # bf16 keeps 8 bits of mantissa: ~0.4% per value
BF16_BATCH = 16
WARMUP, TIMED = 2, 5
LOADER_BATCHES = 5
SPAWN_TIMEOUT_S = 120
DEEPSPEED_TIMEOUT_S = 300
LOOP_SECONDS, LOOP_STEPS, LOOP_TIMEOUT_S = 10, (30, 5000), 300
LOOP_OVERHEAD_WARN = 1.5  # the H200's paper recipe: 1.6x (130 bare vs 79-92 step/s)


@dataclasses.dataclass
class Row:
    """One line of the report: what was checked, what came out, and why it passed or not."""

    section: str
    check: str
    result: str
    figure: float | None = None
    unit: str = ""
    status: str = "info"
    reason: str = ""


# ----------------------------------------------------------------------------- machine


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_devices() -> int:
    """Training processes this node runs: one per GPU, or one on a CPU-only node."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _version(package: str) -> str | None:
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
        "accelerate": _version("accelerate"),
        "deepspeed": _version("deepspeed"),
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


# ----------------------------------------------------- correctness: the infoNCE gather


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


# ------------------------------------------------------------ correctness: bf16, resume


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


# --------------------------------------------------------- correctness: DeepSpeed ZeRO-2


def _launch_env(two_cpu_ranks: bool = True) -> dict[str, str]:
    """The environment of a ``pretrain.py`` the doctor starts: this project importable,
    W&B off; on a CPU node with ``two_cpu_ranks``, DeepSpeed's CPU accelerator and one
    thread per rank (two ranks share the cores)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    e = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONPATH=path)
    if two_cpu_ranks and not torch.cuda.is_available():
        e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return e


@dataclasses.dataclass
class _ShortRun:
    """A short ``pretrain.py`` the doctor started: its exit code, the last line it wrote
    to stderr (what a failure says), its metrics rows (none on failure), its wall time."""

    returncode: int
    last_line: str
    rows: list[dict]
    seconds: float


def _short_run(
    launcher: list[str],
    config: str | None,
    overrides: list[str],
    shards: str,
    *,
    steps: int,
    log_every: int,
    env: dict[str, str],
    timeout: float,
    extra: tuple[str, ...] = (),
) -> _ShortRun:
    """``launcher pretrain.py`` with the user's configuration on ``shards`` for ``steps``
    steps into a temporary folder, without validation, online probe or W&B. It runs in
    the caller's folder: the config and shard paths are relative to it."""
    with tempfile.TemporaryDirectory(prefix="dim-doctor-") as out:
        cmd = [
            *launcher,
            str(ROOT / "pretrain.py"),
            *(["--config", config] if config else []),
            *overrides,
            f"data.train_shards={shards}",
            "data.val_shards=",
            *extra,
            f"train.output_dir={out}",
            f"train.max_steps={steps}",
            "train.warmup_steps=0",
            f"train.log_every={log_every}",
            "train.eval_every=0",
            "wandb.mode=disabled",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
        rows = read_metrics(Path(out) / METRICS) if proc.returncode == 0 else []
    last = (proc.stderr.strip().splitlines() or [""])[-1][:200]
    return _ShortRun(proc.returncode, last, rows, seconds)


def deepspeed_row(config: str | None, overrides: list[str], shards: str, enabled: bool) -> Row:
    check = "DeepSpeed ZeRO-2 runs two steps"
    launch = ROOT / "launch" / "deepspeed_zero2.yaml"
    if not enabled:
        return Row("correctness", check, "not run", status="skip", reason="off: pass --deepspeed")
    if _version("deepspeed") is None or not launch.is_file():
        why = "deepspeed not installed" if launch.is_file() else f"{launch} not found"
        return Row("correctness", check, "not run", status="skip", reason=why)
    processes = local_devices() if torch.cuda.is_available() else 2  # CPU: 2 gloo ranks
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch)]
    run = _short_run(
        [*launcher, "--num_processes", str(processes)],
        config,
        overrides,
        shards,
        steps=2,
        log_every=1,
        env=_launch_env(),
        timeout=DEEPSPEED_TIMEOUT_S,
        extra=("data.num_workers=0",),
    )
    steps = [r.get("step") for r in run.rows]
    ok = steps == [1, 2] and all(math.isfinite(r["loss"]) for r in run.rows)
    return Row(
        "correctness",
        check,
        f"{processes} processes, steps logged {steps} in {run.seconds:.0f} s"
        if ok
        else f"exit {run.returncode}: {run.last_line}",
        run.seconds,
        "s",
        "pass" if ok else "fail",
        "accelerate launch --config_file launch/deepspeed_zero2.yaml pretrain.py, 2 steps",
    )


# ------------------------------------------------------------------------------ speed


def _timed_steps(steps: dict[str, Callable[[], None]], device: str) -> dict[str, float]:
    """Fastest of ``TIMED`` calls of each step after ``WARMUP``, the steps taking turns:
    other jobs only ever add time, and a change in the machine's load hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(WARMUP + TIMED):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= WARMUP:
                times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def _stepper(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], autocast
) -> Callable[[], None]:
    """Forward + backward + AdamW step of ``model``, as one training step does."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with autocast():
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def step_speed(cfg: Config) -> dict[str, float]:
    """images/s of the DIM training step and of the bare backbone's, on one device.

    An image is one image of the data, whatever its number of views (each step encodes
    batch x views of them): the unit of the loop's ``samples_per_s`` and of the loader's
    rate, which these figures are compared with and divided by."""
    device = device_type()
    views = view_count(cfg.data)
    b, m = cfg.train.batch_size, cfg.model
    x = in_model_layout(random_images(cfg, views * b, seed=3, device=device), cfg.train)
    chosen, _ = resolve_precision(cfg.train.mixed_precision, cuda=device == "cuda")
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(chosen)

    def autocast():
        if precision is None:
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=precision)

    torch.manual_seed(cfg.train.seed)
    dim = apply_speed_options(build_model(cfg).to(device).train(), cfg.train)
    bare = create_backbone(m.backbone, in_chans=m.in_chans, img_size=m.img_size).to(device).train()
    if cfg.train.channels_last:
        bare.to(memory_format=torch.channels_last)
    seconds = _timed_steps(
        {
            "dim": _stepper(dim, lambda net: net(*x.chunk(views))[0], autocast),
            "bare": _stepper(bare, lambda net: net(x).mean(), autocast),
        },
        device,
    )
    return {name: b / s for name, s in seconds.items()} | {"views": views}


def loop_speed(
    config: str | None, overrides: list[str], shards: str, step_ips: float, batch: int
) -> tuple[float, int]:
    """(images/s, steps) of ``pretrain.py`` itself on one device: the configuration's
    loader and workers, the host-to-device copy, device augmentation, the per-step
    agreement and logging, which the bare step leaves out. About ``LOOP_SECONDS`` of
    steps, sized by the bare step's rate; the median of the rows after the first third."""
    steps = round(min(max(LOOP_SECONDS * step_ips / batch, LOOP_STEPS[0]), LOOP_STEPS[1]))
    env = _launch_env(two_cpu_ranks=False)
    if torch.cuda.is_available():  # one process, on the first GPU
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    run = _short_run(
        [sys.executable],
        config,
        overrides,
        shards,
        steps=steps,
        log_every=max(steps // 15, 1),
        env=env,
        timeout=LOOP_TIMEOUT_S,
    )
    if run.returncode != 0:
        raise RuntimeError(f"pretrain.py exit {run.returncode}: {run.last_line}")
    rates = [r["samples_per_s"] for r in run.rows]
    late = sorted(rates[len(rates) // 3 :])
    return late[len(late) // 2], steps


def default_shards(folder: Path) -> str:
    """The embedded default data (digits) as training does, written into ``folder``."""
    return str(prepare_digits(folder))


def loader_speed(cfg: Config, shards: str) -> float:
    """images/s of one loader worker: read, decode, (batch-)augment, in this process."""
    data = dataclasses.replace(cfg.data, train_shards=shards, num_workers=0)
    augment = build_batch_augment(data, img_size=cfg.model.img_size, seed=cfg.train.seed, rank=0)
    loader = train_loader(
        data,
        batch_size=cfg.train.batch_size,
        img_size=cfg.model.img_size,
        in_chans=cfg.model.in_chans,
        seed=cfg.train.seed,
        rank=0,
        world_size=1,
    )
    batches, threads = iter(loader), torch.get_num_threads()
    torch.set_num_threads(1)  # what one worker has
    try:
        seen, t0 = 0, 0.0
        for i in range(1 + LOADER_BATCHES):  # the first batch fills the shuffle buffer
            if i == 1:
                t0 = time.perf_counter()
            batch = next(batches)
            if augment is not None:
                augment(batch["image"], step=i)
            seen += len(batch["image"]) if i else 0
        return seen / (time.perf_counter() - t0)
    finally:
        loader.close()
        torch.set_num_threads(threads)


def gathered_bytes_per_sample(cfg: Config) -> dict[str, int]:
    """Bytes per image of what infoNCE gathers, per scope: the image-side critic
    embeddings (global, local), in fp32, as the objective computes them."""
    if cfg.loss.estimator != "infonce":
        return {}
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model.encoder(random_images(cfg, 2, seed=4))
        sides = {
            "global": (
                model.objective.global_critic,
                GLOBAL_INPUTS[cfg.loss.global_input].take(out),
            ),
            "local": (model.objective.local_critic, out.local),
        }
        return {
            scope: critic.embed_a(side.float()).numel() // 2 * 4
            for scope, (critic, side) in sides.items()
            if critic is not None
        }


def allgather_rows(cfg: Config, views: int) -> list[Row]:
    per_sample = gathered_bytes_per_sample(cfg)
    check = "infoNCE all-gather per step, per process (forward)"
    if not per_sample:
        why = f"loss.estimator={cfg.loss.estimator} keeps negatives on the device"
        return [Row("speed", check, "nothing gathered", 0.0, "bytes", "info", why)]
    e = sum(per_sample.values())
    b = cfg.train.batch_size
    formula = (
        f"V x (W-1)/W x W*B x e (each view gathered once), B={b}, V={views}, e={e} bytes "
        f"({', '.join(f'{k} {v}' for k, v in per_sample.items())}); the backward moves as much"
    )
    rows = []
    for nodes in NODES:
        w = nodes * local_devices()
        moved = views * (w - 1) * b * e
        rows.append(
            Row("speed", f"{check}, W={w}", human_bytes(moved), moved, "bytes", "info", formula)
        )
    return rows


def plan_rows(
    cfg: Config, step_ips: float, loop_ips: float, worker_ips: float, epoch: int | None
) -> list[Row]:
    """What the measured rates imply for this node and for N nodes: each device runs at
    the slower of the bare step and the training loop, and the cores must feed them."""
    cores, devices = usable_cores(), local_devices()
    workers = math.ceil(step_ips / worker_ips)
    spare = max(cores - devices, 1)  # one core drives each device's training process
    fed = workers * devices <= spare
    device_ips = min(step_ips, loop_ips)
    node_ips = min(device_ips * devices, worker_ips * spare)
    limit = "devices" if device_ips * devices <= worker_ips * spare else "input (CPU cores)"
    rows = [
        Row(
            "speed",
            "loader workers per device needed",
            f"ceil({step_ips:.0f} / {worker_ips:.0f})",
            workers,
            "workers",
            "info",
            "DIM step img/s over one worker's img/s",
        ),
        Row(
            "speed",
            "cores can feed the devices",
            f"{workers} x {devices} workers vs {spare} spare cores",
            spare,
            "cores",
            "pass" if fed else "warn",
            f"spare = usable cores - one per device; node limited by {limit}"
            + (
                "; on a CPU node the step and the workers share the same cores"
                if device_type() == "cpu"
                else ""
            ),
        ),
        Row(
            "speed",
            "node img/s",
            f"{node_ips:.0f}",
            node_ips,
            "img/s",
            "info",
            "min(devices x min(step, loop) img/s, spare cores x worker img/s)",
        ),
    ]
    run_images = cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum
    for nodes in NODES:
        total = node_ips * nodes
        if epoch:
            rows.append(
                Row(
                    "speed",
                    f"epoch on {nodes} node(s)",
                    _human_time(epoch / total),
                    epoch / total,
                    "s",
                    "info",
                    f"{epoch} images; linear scaling assumed",
                )
            )
        seconds = run_images * devices * nodes / total
        rows.append(
            Row(
                "speed",
                f"train.max_steps on {nodes} node(s)",
                _human_time(seconds),
                seconds,
                "s",
                "info",
                f"{cfg.train.max_steps} steps x batch_size per process: the global batch "
                "grows with the nodes, so the time does not shrink; linear scaling assumed",
            )
        )
    if not epoch:
        rows.append(
            Row(
                "speed",
                "epoch",
                "unknown size",
                None,
                "",
                "skip",
                "no manifest and data.epoch_samples=0",
            )
        )
    return rows


def overhead_row(ratio: float, device: str) -> Row:
    """The loop's time per step over the bare step's, with what to try where it is high."""
    high = ratio > LOOP_OVERHEAD_WARN
    if device == "cpu":
        why = "on a CPU node the loader's workers and the step share the cores"
    else:
        why = "the device waits on the host: a larger batch, or more loader workers, help"
    return Row(
        "speed",
        "loop / bare DIM step time",
        f"{ratio:.2f}x",
        ratio,
        "ratio",
        "warn" if high else "info",
        "what a training step costs beyond its arithmetic"
        + (f"; > {LOOP_OVERHEAD_WARN}x: {why}" if high else ""),
    )


def _human_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def speed_rows(cfg: Config, config: str | None, overrides: list[str], shards: str) -> list[Row]:
    step = step_speed(cfg)
    worker = loader_speed(cfg, shards)
    device = device_type()
    loop, loop_steps = loop_speed(config, overrides, shards, step["dim"], cfg.train.batch_size)
    rows = [
        Row(
            "speed",
            "DIM step img/s per device",
            f"{step['dim']:.0f} on {device}",
            step["dim"],
            "img/s",
            "info",
            f"forward+backward+AdamW on {torch.get_num_threads()} intra-op thread(s), "
            f"batch {cfg.train.batch_size} x {step['views']} view(s), images of the data "
            f"(each encoded {step['views']}x), "
            f"{cfg.model.img_size} px, fastest of {TIMED} after {WARMUP} warm-up",
        ),
        Row(
            "speed",
            "bare backbone img/s per device",
            f"{step['bare']:.0f} on {device}",
            step["bare"],
            "img/s",
            "info",
            f"{cfg.model.backbone}, same batch, mean of its features as the loss",
        ),
        Row(
            "speed",
            "DIM / bare step time",
            f"{step['bare'] / step['dim']:.2f}x",
            step["bare"] / step["dim"],
            "ratio",
            "info",
            "the cost of DIM's heads, critics and estimator",
        ),
        Row(
            "speed",
            "input img/s per worker",
            f"{worker:.0f}",
            worker,
            "img/s",
            "info",
            f"train_loader on {shards}, num_workers=0, one thread, decoded and augmented "
            f"(batch augmentation on the CPU: on a GPU node it runs on the device), "
            f"{LOADER_BATCHES} batches",
        ),
    ]
    rows += [
        Row(
            "speed",
            "training loop img/s per device",
            f"{loop:.0f} on {device}",
            loop,
            "img/s",
            "info",
            f"pretrain.py itself, {loop_steps} steps, data.num_workers={cfg.data.num_workers}: "
            "the loader, device copy and augmentation, per-step agreement and logging "
            "besides the step; median of the rows after the first third",
        ),
        overhead_row(step["dim"] / loop, device),
    ]
    epoch = cfg.data.epoch_samples or dataset_size(shards)
    rows += plan_rows(cfg, step["dim"], loop, worker, epoch)
    return rows + allgather_rows(cfg, step["views"])


# ------------------------------------------------------------------------- the report


def _guarded(section: str, check: str, fn: Callable[[], Row | list[Row]]) -> list[Row]:
    """Run one check; an unexpected error is that check's failure, not the report's end."""
    try:
        out = fn()
    except ConfigError:
        raise
    except Exception as err:  # the report shows what broke
        return [
            Row(section, check, "error", status="fail", reason=f"{type(err).__name__}: {err}"[:300])
        ]
    return out if isinstance(out, list) else [out]


def run_checks(cfg: Config, config: str | None, overrides: list[str], deepspeed: bool) -> list[Row]:
    rows = [*machine_rows(), threads_row(cfg)]
    with tempfile.TemporaryDirectory(prefix="dim-doctor-data-") as tmp:
        shards = cfg.data.train_shards or default_shards(Path(tmp) / "digits")
        rows += _guarded("correctness", "gather_with_grad", gather_row)
        rows += _guarded("correctness", "bf16 step", lambda: bf16_row(cfg))
        rows += _guarded("correctness", "checkpoint", lambda: checkpoint_row(cfg))
        rows += _guarded(
            "correctness", "deepspeed", lambda: deepspeed_row(config, overrides, shards, deepspeed)
        )
        rows += _guarded("speed", "speed", lambda: speed_rows(cfg, config, overrides, shards))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = []
    for section in ("machine", "correctness", "speed"):
        lines.append(f"== {section}")
        for r in (r for r in rows if r.section == section):
            reason = f"  ({r.reason})" if r.reason else ""
            lines.append(f"  [{r.status:<4}] {r.check:<60} {r.result}{reason}")
    return "\n".join(lines)


def to_json(rows: list[Row], wall_s: float, config: str | None, overrides: list[str]) -> dict:
    sections = {s: [] for s in ("machine", "correctness", "speed")}
    for r in rows:
        sections[r.section].append(
            {k: v for k, v in dataclasses.asdict(r).items() if k != "section"}
        )
    return {
        "config": config,
        "overrides": overrides,
        "wall_s": wall_s,
        "ok": not any(r.status == "fail" for r in rows),
        "sections": sections,
    }


class _OneLineParser(argparse.ArgumentParser):
    """A usage mistake is one line on stderr and exit code 2, like a config mistake."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _OneLineParser(
        prog="dim-doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=None, help="YAML file, as pretrain.py takes it")
    p.add_argument("--json", default=None, help="also write the report to this file")
    p.add_argument(
        "--deepspeed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the DeepSpeed ZeRO-2 check (default: on with a GPU, off on CPU: ~1 min)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_intermixed_args(argv)  # options before, between or after the overrides


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.train_shards:
            dataset_size(cfg.data.train_shards)  # shards that do not exist: a mistake, now
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise ConfigError(f"--json: folder {Path(args.json).parent} does not exist")
        deepspeed = torch.cuda.is_available() if args.deepspeed is None else args.deepspeed
        rows = run_checks(cfg, args.config, args.overrides, deepspeed)
    except ConfigError as err:
        print(f"dim-doctor: error: {err}", file=sys.stderr)
        sys.exit(2)
    wall = time.perf_counter() - t0
    print(format_table(rows))
    print(f"wall time {wall:.1f} s")
    report = to_json(rows, wall, args.config, args.overrides)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
