"""train.compile, train.channels_last and train.keep_freed_memory change how the step runs,
not what it computes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.models import speed
from pipeline.models.speed import apply_speed_options, in_model_layout, resolve_precision
from pipeline.objective.model import build_model

TINY = [
    "model.backbone=test_resnet",
    "model.img_size=16",
    "model.fc_dim=32",
    "model.code_dim=16",
    "loss.critic_dim=16",
    "loss.critic_hidden=16",
]


def step(
    overrides: list[str], backend: str = "eager"
) -> tuple[torch.Tensor, dict, torch.nn.Module]:
    cfg = load_config(None, TINY + overrides)
    torch.manual_seed(0)
    model = apply_speed_options(build_model(cfg).train(), cfg.train, backend=backend)
    g = torch.Generator().manual_seed(1)
    x, x2 = (in_model_layout(torch.randn(8, 3, 16, 16, generator=g), cfg.train) for _ in range(2))
    torch.manual_seed(2)  # the same reparameterisation noise and negatives
    loss, _ = model(x, x2)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, model


def test_channels_last_and_compile_give_the_same_loss_gradients_and_keys():
    # Catches compile wrapping the modules (state-dict keys gain "_orig_mod.", so
    # checkpoints and exports stop loading) and layouts that change the maths.
    loss, grads, plain = step([])
    for options in (["train.channels_last=true"], ["train.compile=true"]):
        other_loss, other_grads, model = step(options)
        assert list(model.state_dict()) == list(plain.state_dict())
        assert torch.allclose(other_loss, loss, rtol=1e-4, atol=1e-5), options
        assert grads.keys() == other_grads.keys()
        for k in grads:
            assert torch.allclose(other_grads[k], grads[k], rtol=1e-3, atol=1e-5), (options, k)
    _, _, last = step(["train.channels_last=true"])
    convs = [p for p in last.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_in_model_layout_follows_channels_last():
    images = torch.zeros(2, 3, 4, 4)
    nhwc = load_config(None, ["train.channels_last=true"]).train
    assert in_model_layout(images, nhwc).is_contiguous(memory_format=torch.channels_last)
    assert in_model_layout(images, load_config(None, []).train) is images


def test_linear_critic_embeddings_train_and_concat_refuses_them():
    """critic_hidden=0: the cheapest local critic embeds each location of the map by one
    linear map (the shortcut's weights), and it trains. Catches a hidden layer left in or
    a default width put back (the embedding is no longer that linear map), the weights
    applied transposed or to the wrong axis, and a silently ignored setting for concat
    critics (a zero hidden width, or a temperature they have no use for)."""
    cfg = load_config(None, [*TINY, "loss.critic_hidden=0"])
    model = build_model(cfg)
    critic = model.objective.local_critic
    weight = critic.f.shortcut.weight
    assert sum(p.numel() for p in critic.f.parameters()) == weight.numel()  # nothing else
    fmap = torch.randn(3, weight.shape[1], 4, 5)
    with torch.no_grad():
        by_location = torch.einsum("dc,nchw->ndhw", weight, fmap)
        torch.testing.assert_close(critic.embed_a(fmap), by_location.flatten(2))
    loss, _ = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    loss.backward()
    assert torch.isfinite(loss) and critic.f.shortcut.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="critic_hidden=0"):
        load_config(None, ["loss.critic_hidden=0", "loss.local_critic=concat"])
    with pytest.raises(ConfigError, match="critic_temperature"):
        load_config(None, ["loss.critic_temperature=0.1", "loss.local_critic=concat"])


RELEASE_PROBE = """
import sys, psutil, torch
from pipeline.models.speed import keep_freed_memory
applied = keep_freed_memory(sys.argv[1] == "keep")
process = psutil.Process()
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, far above glibc's largest default mmap threshold
held = process.memory_info().rss
del block
print(applied, (held - process.memory_info().rss) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_keep_freed_memory_keeps_a_freed_block_in_the_process():
    """With train.keep_freed_memory glibc keeps a freed 64 MiB block for reuse; without it
    the block goes back to the OS at once. Catches: a mallopt call that does nothing (wrong
    parameter number or a threshold glibc refuses), the flag ignored."""
    released = {}
    for mode in ("keep", "default"):
        out = subprocess.run(
            [sys.executable, "-c", RELEASE_PROBE, mode],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout.split()
        assert out[0] == str(mode == "keep")
        released[mode] = float(out[1])
    assert released["default"] > 48, released
    assert released["keep"] < 16, released


@pytest.mark.parametrize(
    "choice,native,chosen,words",
    [
        ("auto", True, "bf16", "precision: bf16 (auto: this CPU computes bf16 natively)"),
        ("auto", False, "no", "precision: fp32 (auto: this CPU has no native bf16)"),
        ("bf16", False, "bf16", "warning: this CPU has no native bf16"),
        ("bf16", True, "bf16", "precision: bf16"),
        ("no", True, "no", "precision: fp32"),
        ("fp16", False, "fp16", "precision: fp16"),
    ],
)
def test_mixed_precision_auto_is_bf16_only_where_native(monkeypatch, choice, native, chosen, words):
    """auto asks the device: bf16 where it is computed in hardware, fp32 where torch would
    emulate it (slower than fp32 on such a CPU); an explicit bf16 is kept, with a warning."""
    monkeypatch.setattr(speed, "native_bf16", lambda cuda: native)
    got, line = resolve_precision(choice, cuda=False)
    assert got == chosen and words in line, line
    assert load_config(None, [f"train.mixed_precision={choice}"]).train.mixed_precision == choice


def test_native_bf16_on_cpu_is_onednn_s_answer():
    assert speed.native_bf16(cuda=False) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
