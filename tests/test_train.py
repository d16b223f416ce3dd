"""End-to-end pretraining runs on CPU: 1 process, 2 processes (gloo), DeepSpeed ZeRO-2.

Each run is a subprocess, as a user would start it; the model is tiny (test_resnet at
32x32, batch 8) so the whole file takes a couple of minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from train_helpers import (
    ACCELERATE_LAUNCH,
    ROOT,
    TINY,
    env,
    metrics,
    pretrain_cmd,
    run,
    write_shards,
)
from wandb_log import history, run_files

from pipeline.train.optim import lr_factor

MI_KEYS = ("mi/local/infonce",)  # the default recipe: DIM(L) infoNCE


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"))


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        try:
            rows = metrics(out)
        except (FileNotFoundError, json.JSONDecodeError):
            rows = []
        if rows and rows[-1]["step"] >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def test_single_process_sigterm_resume_wandb_export(shards, tmp_path):
    """SIGTERM to the whole process group mid-way (as SLURM signals every process of a
    job step, data-loader workers included), then resumed: every step logged exactly
    once, one W&B run id across both parts, the loss falls, and the export reproduces
    the trained features."""
    out = tmp_path / "run"
    args = [
        *TINY,
        f"data.train_shards={shards}",
        f"train.output_dir={out}",
        "train.max_steps=120",
        "train.log_every=1",
        "train.save_every=10",
        "train.keep_last=3",
        "data.num_workers=2",
    ]
    proc = subprocess.Popen(
        pretrain_cmd(*args),
        cwd=ROOT,
        env=env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(out, 25, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = _checkpoint_steps(out)[-1]
    assert 25 <= stopped < 120
    meta = json.loads((out / "checkpoints" / f"step_{stopped:07d}" / "meta.json").read_text())
    assert meta["tag"] == "preempted"
    assert not (out / "export").exists()  # not finished: no export yet

    second = run(pretrain_cmd(*args))
    assert second.returncode == 0
    assert "resumed from" in second.stdout + second.stderr

    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 121))
    for r in rows:
        assert all(
            k in r
            for k in (
                *MI_KEYS,
                "loss",
                "kl",
                "lr",
                "grad_norm",
                "samples_per_s",
                "samples_per_s_total",
                "data/skipped",
            )
        )
    first, last = rows[:10], rows[-10:]
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first)
    assert _checkpoint_steps(out)[-1] == 120 and len(_checkpoint_steps(out)) <= 3

    # W&B (offline): both parts write the same run id, and the history has the MI keys.
    run_id = (out / "wandb_id.txt").read_text().strip()
    files = run_files(out)
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    logged = [row for f in files for row in history(f)]
    assert all(k in logged[-1] for k in MI_KEYS)
    assert sorted(row["_step"] for row in logged) == list(range(1, 121))
    assert abs(logged[-1]["mi/local/infonce"] - rows[-1]["mi/local/infonce"]) < 1e-6

    _check_export(out)


def _check_export(out: Path) -> None:
    """export/model.safetensors loads strictly into plain timm and matches the checkpoint."""
    import timm
    import torch
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.objective.model import build_model

    backbone = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    backbone.load_state_dict(load_file(str(out / "export" / "model.safetensors")), strict=True)
    model = build_model(load_config(out / "config.yaml"))
    model.load_state_dict(
        load_file(str(out / "checkpoints" / "step_0000120" / "model.safetensors"))
    )
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    backbone.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model.encoder(x).pooled)
    assert json.loads((out / "export" / "config.json").read_text())["architecture"] == "test_resnet"


def test_two_processes_gloo_sigterm_resume(shards, tmp_path):
    """`accelerate launch --config_file launch/cpu.yaml` runs two ranks; SIGTERM to the
    launcher reaches both, they agree on a step, save, and a second launch finishes."""
    out = tmp_path / "ddp"
    cmd = pretrain_cmd(
        *TINY,
        f"data.train_shards={shards}",
        f"train.output_dir={out}",
        "train.max_steps=40",
        "train.log_every=1",
        "train.save_every=100",
        launcher=[*ACCELERATE_LAUNCH, "--config_file", "launch/cpu.yaml"],
    )
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(out, 8, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to the workers
    proc.communicate(timeout=120)
    (stopped,) = _checkpoint_steps(out)
    assert 8 <= stopped < 40
    ckpt = out / "checkpoints" / f"step_{stopped:07d}"
    assert json.loads((ckpt / "meta.json").read_text())["tag"] == "preempted"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()

    assert run(cmd).returncode == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert all(r["world_size"] == 2 and r["samples_seen"] == r["step"] * 16 for r in rows)
    assert all(k in r for r in rows for k in MI_KEYS)
    files = run_files(out)  # W&B on the main process only: one file per launch
    assert len(files) == 2 and all(k in history(files[-1])[-1] for k in MI_KEYS)
    assert (out / "export" / "model.safetensors").is_file()


def test_deepspeed_zero2_runs_and_resumes(shards, tmp_path):
    """ZeRO-2 through accelerate on 2 CPU processes; a second launch resumes from its
    checkpoint and goes on from its weights: two more steps leave them far closer to the
    step-4 weights than those are to the initial ones (a resume that restarted from the
    seed's weights would end about as far from step 4 as the initial ones are)."""
    out = tmp_path / "ds"
    launcher = [
        *ACCELERATE_LAUNCH,
        "--config_file",
        "launch/deepspeed_zero2.yaml",
        "--num_processes",
        "2",
    ]
    args = [
        *TINY,
        f"data.train_shards={shards}",
        f"train.output_dir={out}",
        "train.log_every=1",
        "train.save_every=2",
    ]
    first = run(pretrain_cmd(*args, "train.max_steps=4", launcher=launcher), timeout=420)
    assert first.returncode == 0
    assert (out / "checkpoints" / "step_0000004" / "pytorch_model").is_dir()  # DeepSpeed layout
    second = run(pretrain_cmd(*args, "train.max_steps=6", launcher=launcher))
    assert second.returncode == 0
    assert "resumed from" in second.stdout + second.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["world_size"] == 2 for r in rows)
    assert (out / "export" / "model.safetensors").is_file()
    start, saved, resumed = (_deepspeed_weights(out, step) for step in (0, 4, 6))
    assert _distance(resumed, saved) < 0.5 * _distance(saved, start)


def _deepspeed_weights(out: Path, step: int) -> dict:
    """The DIM model's parameters in the DeepSpeed checkpoint of ``step``; at 0, the
    seeded initial ones the run started from."""
    import torch

    from pipeline.config import load_config
    from pipeline.train.loop import build_seeded_model

    model = build_seeded_model(load_config(out / "config.yaml"))
    initial = {k: v.detach() for k, v in model.named_parameters()}
    if step == 0:
        return initial
    states = out / "checkpoints" / f"step_{step:07d}" / "pytorch_model"
    module = torch.load(
        states / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["module"]
    return {k: module[k] for k in initial}


def _distance(a: dict, b: dict) -> float:
    return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a) ** 0.5


# A NaN weight is refused by the config loader; a huge rate drives the code to inf instead.
DIVERGE = ["train.lr=1e30", "train.warmup_steps=0"]


def test_nonfinite_loss_names_step_and_term(shards, tmp_path):
    proc = run(
        pretrain_cmd(
            *TINY,
            f"data.train_shards={shards}",
            f"train.output_dir={tmp_path}",
            "train.max_steps=3",
            *DIVERGE,
        )
    )
    assert proc.returncode == 1
    assert "non-finite loss at step 2" in proc.stderr and "loss/kl" in proc.stderr
    assert "Traceback" not in proc.stderr


def four_logged_steps(shards: str, out: Path, *overrides: str):
    """A tiny run of 4 steps into ``out``, every step logged."""
    cmd = pretrain_cmd(*TINY, f"data.train_shards={shards}", f"train.output_dir={out}", *overrides)
    return run([*cmd, "train.max_steps=4", "train.log_every=1"])


def test_grad_accum_lars_bf16(shards, tmp_path):
    """Options together: 2 micro-batches per step, LARS, bf16 autocast, warmup + cosine,
    two views augmented batched in the loop."""
    proc = four_logged_steps(
        shards,
        tmp_path,
        "train.grad_accum=2",
        "train.optimizer=lars",
        "train.lr=0.5",
        "train.warmup_steps=2",
        "train.mixed_precision=bf16",
        "data.augment=amdim",
    )
    assert proc.returncode == 0
    assert "precision: bf16" in proc.stdout  # said at start, with a warning where emulated
    rows = metrics(tmp_path)
    assert [r["samples_seen"] for r in rows] == [16, 32, 48, 64]
    lrs = [r["lr"] for r in rows]  # the rate each step used: warm-up, then cosine
    assert lrs == pytest.approx([0.5 * lr_factor(r["step"] - 1, 2, 4) for r in rows])
    assert lrs == pytest.approx([0.25, 0.5, 0.5, 0.25])
    assert all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in rows)


def test_online_probe_runs_in_the_loop_every_eval_every_steps(shards, tmp_path):
    """train.eval_every=2: rows 2 and 4 carry probe/knn and probe/linear, accuracies well
    above chance on digits; rows 1 and 3 carry none, and training goes on after a probe.
    Catches: the probe not wired into the loop, run on every logged step, scoring at
    chance (features of the wrong view or labels out of step), or ending the run."""
    proc = four_logged_steps(shards, tmp_path, f"data.val_shards={shards}", "train.eval_every=2")
    assert proc.returncode == 0
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        probed = {k: v for k, v in row.items() if k.startswith("probe/")}
        if row["step"] % 2:
            assert probed == {}
        else:
            assert set(probed) == {"probe/knn", "probe/linear"}
            assert all(0.3 < v <= 1.0 for v in probed.values()), probed  # chance is 0.1
    assert all(r["loss"] == r["loss"] for r in rows)


def test_grad_accum_steps_once_on_the_mean_gradient_of_its_micro_batches():
    """train.grad_accum=2, in process through the loop's own accelerator and TrainStep:
    one step leaves the weights a plain optimizer step on the mean of the two
    micro-batches' gradients gives, and reports that mean's norm. Catches: the
    accumulation count not passed to the Accelerator or the accumulate context dropped
    (two optimizer steps), gradients zeroed between micro-batches (the last one alone),
    the loss not divided by grad_accum (twice the norm)."""
    import copy

    import torch

    from pipeline.config import load_config
    from pipeline.train.loop import build_seeded_model, make_accelerator, prepare_training
    from pipeline.train.optim import build_optimizer, build_scheduler
    from pipeline.train.step import TrainStep

    cfg = load_config(None, [*TINY, "train.grad_accum=2", "train.grad_clip=0", "data.augment=none"])
    g = torch.Generator().manual_seed(3)
    micro = [torch.rand(8, 3, 32, 32, generator=g) for _ in range(2)]
    model = build_seeded_model(cfg)
    reference = copy.deepcopy(model)

    accelerator = make_accelerator(cfg)
    train_step = TrainStep(accelerator, cfg, *prepare_training(accelerator, model, cfg.train))
    torch.manual_seed(4)  # the same noise and negatives in both
    result = train_step(iter([{"image": x} for x in micro]), 0)

    optimizer = build_optimizer(reference, cfg.train)
    build_scheduler(optimizer, cfg.train)  # the warmup's first rate
    torch.manual_seed(4)
    for x in micro:
        (reference(x)[0] / len(micro)).backward()
    norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), float("inf"))
    optimizer.step()

    assert float(result.grad_norm) == pytest.approx(float(norm), rel=1e-5)
    trained, expected = dict(model.named_parameters()), dict(reference.named_parameters())
    assert any(
        not torch.equal(p, trained[k]) for k, p in build_seeded_model(cfg).named_parameters()
    )
    for k, p in expected.items():
        torch.testing.assert_close(trained[k], p, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("extra,code", [([], 0), (DIVERGE, 1)])
def test_run_with_loader_workers_exits(shards, tmp_path, extra, code):
    """Workers start with the stop signals blocked; they must still be stopped at the
    end of a run and when it fails, or the interpreter waits for them forever."""
    proc = run(
        pretrain_cmd(
            *TINY,
            f"data.train_shards={shards}",
            f"train.output_dir={tmp_path}",
            "train.max_steps=3",
            "data.num_workers=2",
            *extra,
        ),
        timeout=120,
    )
    assert proc.returncode == code


# The loop's helpers, in process: each does the one thing its name says.


def _accelerator(ds_config: dict | None = None):
    import torch

    plugin = None if ds_config is None else SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(
        device=torch.device("cpu"),
        num_processes=1,
        state=SimpleNamespace(deepspeed_plugin=plugin),
        unwrap_model=lambda m: m,
    )


def test_agree_reports_nan_and_raise_if_nonfinite_names_step_and_terms():
    """`agree` only reduces (a NaN term comes back, not raised); the check names the step
    and just the non-finite terms. Catches the check folded back into the reduction, or
    naming a finite term."""
    import torch

    from pipeline.train.step import NonFiniteLoss, agree, raise_if_nonfinite

    sums = {"loss": torch.tensor(float("nan")), "loss/kl": torch.tensor(0.5)}
    vote = agree(_accelerator(), True, 3, sums)
    assert vote.stopping and vote.skipped == 3 and vote.means["loss/kl"] == 0.5
    with pytest.raises(NonFiniteLoss, match=r"at step 7: loss \(loss=nan\)$"):
        raise_if_nonfinite(vote.means, 7)
    raise_if_nonfinite({"loss": 1.0}, 7)  # finite: nothing


def test_deepspeed_half_recast_and_autocast_inside_the_engine():
    """Under DeepSpeed bf16 the BatchNorm statistics are cast by the recast alone, and the
    forward of the model and of its encoder runs under autocast even where an autocast
    around the call is switched off, as DeepSpeed's engine does on a GPU. Catches: the
    autocast entered around the engine's call (the first H200 run: 'Input type
    (torch.cuda.FloatTensor) and weight type (CUDABFloat16Type) should be the same'),
    the encoder called alone (the online probe) left without it, and anything done
    without DeepSpeed."""
    import torch

    from pipeline.train.step import autocast_inside_deepspeed, recast_batchnorm_for_deepspeed

    class Model(torch.nn.Sequential):  # a DIM in miniature: a forward, and an encoder
        def __init__(self):
            super().__init__(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
            self.encoder = torch.nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self[1](self[0](x))

    def model():
        return Model().to(torch.bfloat16)  # the engine's bf16 weights

    x = torch.randn(2, 3, 4, 4)  # the loader's fp32 images
    plain, bf16 = _accelerator(), _accelerator({"bf16": {"enabled": True}})
    untouched = model()
    recast_batchnorm_for_deepspeed(plain, untouched)
    autocast_inside_deepspeed(plain, untouched)
    assert "forward" not in vars(untouched) and "forward" not in vars(untouched.encoder)
    with pytest.raises(RuntimeError, match=r"should be the same|same dtype"):
        untouched(x)

    net = model()
    net[1].running_mean.data = net[1].running_mean.data.float()  # the engine leaves them
    net[1].running_var.data = net[1].running_var.data.float()
    recast_batchnorm_for_deepspeed(bf16, net)
    assert net[1].running_mean.dtype == net[1].running_var.dtype == torch.bfloat16
    autocast_inside_deepspeed(bf16, net)
    with torch.autocast("cpu", enabled=False):  # what the engine does around the module
        assert net(x).dtype == torch.bfloat16
        assert net.encoder(x).dtype == torch.bfloat16
    assert net[0].weight.dtype == torch.bfloat16  # weights are the engine's business


def test_eval_mode_restores_each_module_own_state():
    """Inside: every module in eval mode. After, also after an error: each back in its
    own mode (catches restoring all to train, or not restoring on an exception)."""
    import torch

    from pipeline.eval.features import eval_mode

    training, evaluating = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1).eval()
    with pytest.raises(KeyError), eval_mode(training, evaluating):
        assert not training.training and not evaluating.training
        raise KeyError
    assert training.training and not evaluating.training
