"""The model folder: timm loads it, load_encoder round-trips it, the card carries the
evaluation, dim-export stages and refuses to push without a token or network, and a
training run logs the folder as a W&B model artifact."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from train_helpers import PY, TINY, pretrain_cmd, run, write_shards
from wandb_log import history, records, run_files

import pipeline  # noqa: F401  registers this project's backbones with timm (where it does)
from pipeline.core.schema import Config, ModelConfig
from pipeline.models.encoder import DIMEncoder
from pipeline.objective.model import build_model
from pipeline.share.export import EXPORT_DIR, export_encoder, find_export, load_encoder

# timm-native backbones (a CNN; a ViT, whose img_size goes into config.json's model_args),
# and one this project registers (loads through timm only after `import pipeline`)
BACKBONES = ["test_resnet", "test_vit", "dim_conv32"]


def _config(backbone: str) -> Config:
    cfg = Config()
    m = cfg.model
    m.backbone, m.img_size, m.fc_dim, m.code_dim = backbone, 32, 16, 8
    return cfg


def _export(backbone: str, folder: Path, seed: int = 0) -> DIMEncoder:
    from pipeline.share.card import render_card

    cfg = _config(backbone)
    torch.manual_seed(seed)
    encoder = build_model(cfg).encoder.eval()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults, so a lost buffer shows
        for mod in encoder.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    card = render_card(cfg.to_dict(), step=7, samples_seen=56, world_size=1, location=str(folder))
    export_encoder(encoder, folder, dataclasses.asdict(cfg.model), card=card)
    return encoder


@pytest.mark.parametrize("backbone", BACKBONES)
def test_timm_local_dir_gives_the_trained_features(backbone, tmp_path):
    """Catches: a state dict timm cannot load, lost BatchNorm buffers, a config.json
    without the training input size / normalisation, source-weight tags (in1k) left in."""
    folder = tmp_path / "model"
    encoder = _export(backbone, folder)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), encoder(x).pooled, atol=1e-5, rtol=0)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == backbone and config["num_features"] == model.num_features
    pcfg = config["pretrained_cfg"]
    assert (
        pcfg["input_size"] == [3, 32, 32] and pcfg["mean"] == [0.5] * 3 and pcfg["std"] == [0.5] * 3
    )
    assert pcfg["tag"] == "dim" and "license" not in pcfg
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 32, 32) and tuple(data["mean"]) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_load_encoder_round_trips(backbone, tmp_path):
    """Every output of the DIM encoder (local map, pooled, fc, mu, logvar) comes back."""
    folder = tmp_path / "model"
    encoder = _export(backbone, folder)
    loaded = load_encoder(folder)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for a, b in zip(encoder(x), loaded(x), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert find_export(folder / "model.safetensors") == folder


def test_card_blocks_replace_in_place():
    from pipeline.share.card import get_block, set_block

    text = "# card\n\nintro\n"
    once = set_block(text, "evaluation", "table 1", heading="Evaluation")
    twice = set_block(once + "\nmy own notes\n", "evaluation", "table 2")
    assert get_block(twice, "evaluation") == "table 2"
    assert twice.count("dim:evaluation:begin") == 1 and "table 1" not in twice
    assert "my own notes" in twice and twice.count("## Evaluation") == 1


def test_card_table_has_a_column_per_probe_that_ran():
    """A probe evaluate adds later (or leaves out) must not vanish from the card or shift
    another probe's numbers into its column."""
    from pipeline.share.card import evaluation_block

    block = evaluation_block(
        {
            "dim": {"conv": {"linear": 0.5, "mlp": 0.625, "knn": 0.25}},
            "pixels": {"pixels": {"linear": 0.9, "knn": 0.8}},
        },
        {"k": 20},
    )
    assert "| model | view | linear probe | MLP probe | k-NN |" in block
    assert "| dim | conv | 50.00% | 62.50% | 25.00% |" in block
    assert "| pixels | pixels | 90.00% | - | 80.00% |" in block


def _evaluate_args(checkpoint: Path, shards: str, train: int, test: int, *extra: str) -> list[str]:
    """dim-evaluate on ``train`` / ``test`` samples of the same tiny shards."""
    return [
        *("--checkpoint", str(checkpoint), "--train-shards", shards, "--test-shards", shards),
        *("--batch-size", "32", "--knn-k", "5", "--limit-train", str(train)),
        *("--limit-test", str(test), *extra),
    ]


def test_evaluate_writes_its_table_into_the_card(tmp_path):
    """Run twice: the card holds the latest table, once, and the rest of the card stays."""
    from huggingface_hub import ModelCard

    from pipeline.evaluate import main
    from pipeline.share.card import get_block

    shards = write_shards(tmp_path / "shards", n=96, per_shard=48)
    run_dir = tmp_path / "run"
    _export("test_resnet", run_dir / EXPORT_DIR)
    args = _evaluate_args(run_dir, shards, 64, 32, "--json", str(tmp_path / "eval.json"))
    args.append("--update-card")  # the shards are not the run's data.val_shards
    assert main(args) == 0
    assert main(args) == 0
    text = (run_dir / EXPORT_DIR / "README.md").read_text()
    results = json.loads((tmp_path / "eval.json").read_text())
    block = get_block(text, "evaluation")
    assert text.count("dim:evaluation:begin") == 1 and "Not evaluated yet" not in text
    knn = 100 * results["dim"]["conv"]["knn"]
    assert f"| dim | conv | {100 * results['dim']['conv']['linear']:.2f}% |" in block
    assert f"{knn:.2f}% |" in block.split("| dim | conv |")[1].splitlines()[0]
    assert "| pixels | pixels |" in block and "random_init" in block
    card = ModelCard(text)  # still a valid Hugging Face card
    assert card.data.library_name == "timm" and "deep-infomax" in card.data.tags
    assert "## Training configuration" in text and "backbone: test_resnet" in text


def _cli(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    no_token = dict.fromkeys(("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"))
    return run([PY, "-m", "pipeline.export", *args], timeout=120, env_update=no_token | extra_env)


def test_dim_export_dry_run_lists_what_would_be_uploaded(tmp_path):
    folder = tmp_path / "run" / EXPORT_DIR
    _export("test_resnet", folder)
    staged = tmp_path / "staged"
    proc = _cli(
        str(tmp_path / "run"),
        "--push",
        "me/dim-test",
        "--dry-run",
        "--out",
        str(staged),
        "--license",
        "mit",
        HF_HOME=str(tmp_path / "hf"),
    )
    assert proc.returncode == 0, proc.stderr
    names = ["README.md", "config.json", "dim_head.safetensors", "model.safetensors"]
    assert "dry run" in proc.stdout and "me/dim-test" in proc.stdout
    assert [line.split()[0] for line in proc.stdout.splitlines()[1:]] == names
    assert sorted(p.name for p in staged.iterdir()) == names
    card = (staged / "README.md").read_text()
    assert 'create_model("hf-hub:me/dim-test"' in card and "license: mit" in card
    assert "local-dir:" not in card
    # the staged folder is the model: timm loads it
    timm.create_model(f"local-dir:{staged}", pretrained=True)


@pytest.mark.parametrize(
    "extra, says",
    [
        (
            {"HF_TOKEN": "hf_fake", "HF_ENDPOINT": "http://127.0.0.1:9"},
            "cannot reach the Hugging Face Hub",
        ),
        ({"HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "1"}, "cannot reach the Hugging Face Hub"),
    ],
)
def test_dim_export_push_without_token_or_network_is_one_line(tmp_path, extra, says):
    _export("test_resnet", tmp_path / "run" / EXPORT_DIR)
    proc = _cli(
        str(tmp_path / "run"), "--push", "me/dim-test", HF_HOME=str(tmp_path / "hf"), **extra
    )
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "nothing was uploaded" in err[0], proc.stderr
    assert "pushed" not in proc.stdout


@pytest.mark.parametrize(
    "args, says",
    [
        (["--push", "me/dim-test"], "--push needs a Hugging Face token"),
        (["--push", "me/bad name!"], "--push 'me/bad name!'"),
        (["--push", "nobody"], "--push expects ORG/NAME"),
        ([], "nothing to do"),
        (["--out", "/proc/sys/dim-model"], "--out='/proc/sys/dim-model'"),
    ],
)
def test_dim_export_mistakes_are_one_line_before_anything_is_built(tmp_path, args, says):
    """Bugs caught: an upload without a token was refused only after the folder was built
    (and as exit 1, a failure, not a mistake); an unwritable --out failed in mkdtemp."""
    _export("test_resnet", tmp_path / "run" / EXPORT_DIR)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = _cli(str(tmp_path / "run"), *args, HF_HOME=str(tmp_path / "hf"))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and says in err[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_dim_export_bad_input_is_one_line(tmp_path):
    proc = _cli(str(tmp_path), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "no exported encoder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # --out on a folder of other things: refused, and the things stay
    _export("test_resnet", tmp_path / "run" / EXPORT_DIR)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    proc = _cli(str(tmp_path / "run"), "--out", str(tmp_path / "mine"))
    assert proc.returncode == 2 and "is not a model folder" in proc.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_run_exports_a_timm_folder_and_logs_it_as_a_wandb_artifact(tmp_path, monkeypatch):
    """A real (tiny) run with per-checkpoint exports: the final folder gives the trained
    encoder's features through timm, each checkpoint holds its own model folder, and
    the offline W&B run records the folder as versions of a ``model`` artifact."""
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.objective.model import build_model

    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    shards = write_shards(tmp_path / "shards", n=64, per_shard=64)
    out = tmp_path / "run"
    proc = run(
        pretrain_cmd(
            *TINY,
            f"data.train_shards={shards}",
            f"train.output_dir={out}",
            "train.max_steps=4",
            "train.save_every=2",
            "train.log_every=1",
            "train.export_checkpoints=true",
        )
    )
    assert proc.returncode == 0
    folder = out / EXPORT_DIR
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "dim_head.safetensors",
        "model.safetensors",
    ]
    assert (out / "checkpoints" / "step_0000002" / EXPORT_DIR / "model.safetensors").is_file()

    model = build_model(load_config(out / "config.yaml"))
    model.load_state_dict(
        load_file(str(out / "checkpoints" / "step_0000004" / "model.safetensors"))
    )
    backbone = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model.encoder.eval()(x).pooled, atol=1e-5, rtol=0)

    card = (folder / "README.md").read_text()
    assert "4 optimizer steps" in card and shards in card
    run_id = (out / "wandb_id.txt").read_text().strip()
    assert f"/{run_id}`" in card  # the card names the W&B run

    (wandb_file,) = run_files(out)  # the training run
    arts = [r.artifact for r in records(wandb_file) if r.WhichOneof("record_type") == "artifact"]
    assert {a.name for a in arts} == {f"model-{run_id}"} and all(a.type == "model" for a in arts)
    final = arts[-1]
    assert "final" in final.aliases and "step_4" in final.aliases
    assert {e.path for e in final.manifest.contents} == {
        "README.md",
        "config.json",
        "dim_head.safetensors",
        "model.safetensors",
    }
    assert len(arts) >= 2  # the checkpoint exports at steps 2 and 4, then the final one
    # evaluate --wandb on the export joins the same W&B run (a second .wandb file of that id)
    shown = run(
        [
            PY,
            "-m",
            "pipeline.evaluate",
            *_evaluate_args(folder, shards, 48, 16, "--wandb", "--update-card"),
        ]
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    files = run_files(out)
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    logged = [row for f in files for row in history(f)]
    assert any("eval/dim/conv/linear" in row for row in logged)
    assert "| dim | conv |" in (folder / "README.md").read_text()

    # offline: the files wait for `wandb sync` inside the run folder, not in the home folder
    staged = list((out / "wandb" / "data" / "artifacts" / "staging").iterdir())
    sizes = sorted(p.stat().st_size for p in staged)
    assert (folder / "model.safetensors").stat().st_size in sizes


def test_a_training_checkpoint_is_exported_on_first_use(tmp_path):
    """``find_export(RUN/checkpoints/step_N)`` of a run saved without
    ``train.export_checkpoints`` writes that step's model folder once, holding the
    encoder of that checkpoint (not the final one); a non-DIM safetensors is refused."""
    from safetensors.torch import load_file, save_file

    from pipeline.config import load_config
    from pipeline.core.errors import ConfigError

    shards = write_shards(tmp_path / "shards", n=64, per_shard=64)
    out = tmp_path / "run"
    cmd = pretrain_cmd(
        *TINY,
        f"data.train_shards={shards}",
        f"train.output_dir={out}",
        "train.max_steps=4",
        "train.save_every=2",
    )
    assert run(cmd).returncode == 0
    step2 = out / "checkpoints" / "step_0000002"
    assert not (step2 / EXPORT_DIR).exists()
    folder = find_export(step2)
    assert folder == step2 / EXPORT_DIR and "training step 2" in (folder / "README.md").read_text()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert find_export(step2) == folder  # written once
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime

    model = build_model(load_config(out / "config.yaml")).eval()
    model.load_state_dict(load_file(str(step2 / "model.safetensors")))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model.encoder(x), load_encoder(folder).eval()(x)
        final = load_encoder(out).eval()(x)
    torch.testing.assert_close(got.mu, want.mu, atol=1e-5, rtol=0)
    assert not torch.allclose(got.mu, final.mu, atol=1e-4)  # step 2, not step 4

    odd = out / "checkpoints" / "step_0000009"
    odd.mkdir()
    save_file({"w": torch.zeros(2)}, str(odd / "model.safetensors"))
    with pytest.raises(ConfigError, match="holds no DIM encoder weights"):
        find_export(odd)

    # A run stopped before its end has checkpoints but no export: the refusal names the
    # latest checkpoint to pass instead (the first H200 run, stopped by SIGTERM, got only
    # "pass a run's output folder or its export").
    shutil.rmtree(odd)
    for folder in (out / EXPORT_DIR, step2 / EXPORT_DIR):
        shutil.rmtree(folder)
    latest = out / "checkpoints" / "step_0000004"
    with pytest.raises(ConfigError, match=f"no final export .*its latest {latest}"):
        find_export(out)


def test_evaluate_of_an_export_joins_the_training_run(tmp_path):
    """An export sits in RUN/export or RUN/checkpoints/step_N/export; evaluate --wandb
    must find the run's wandb_id.txt above it, not start a separate run."""
    from pipeline.evaluate import _training_run

    (tmp_path / "wandb_id.txt").write_text("abc123\n")
    nested = tmp_path / "checkpoints" / "step_0000004" / EXPORT_DIR
    nested.mkdir(parents=True)
    assert _training_run(nested)["id"] == "abc123"
    assert _training_run(tmp_path / EXPORT_DIR) == {}  # no such folder: nothing to join


def test_a_killed_export_leaves_nothing_that_is_read_or_kept(tmp_path):
    """export_encoder builds beside the folder and swaps it in. A kill while building
    leaves a half folder that find_export must not pick and remove_partial_export
    removes; a kill between the two renames leaves the old export parked, and
    remove_partial_export puts it back."""
    from pipeline.share.export import remove_partial_export

    run_dir = tmp_path / "run"
    _export("test_resnet", run_dir / "checkpoints" / "step_0000002" / EXPORT_DIR)
    (run_dir / ".tmp-export").mkdir()  # half a newer export, as a kill leaves it
    (run_dir / ".tmp-export" / "config.json").write_text('{"dim": {}}')
    assert find_export(run_dir).parent.name == "step_0000002"
    remove_partial_export(run_dir / EXPORT_DIR)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]

    _export("test_resnet", run_dir / ".tmp-old-export")  # parked; its successor never came
    (run_dir / ".tmp-export").mkdir()
    remove_partial_export(run_dir / EXPORT_DIR)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", EXPORT_DIR]
    assert find_export(run_dir) == run_dir / EXPORT_DIR


@pytest.mark.parametrize("change", ["extra key", "missing key", "other fc_dim"])
def test_load_encoder_refuses_a_head_that_does_not_fit(tmp_path, change):
    """dim_head.safetensors from another run or architecture than config.json describes:
    one ConfigError naming the file, not a half-loaded encoder or a torch traceback.
    Catches: strict=False keys ignored (a head trained for nothing), a size mismatch
    surfacing as torch's RuntimeError."""
    from safetensors.torch import load_file, save_file

    from pipeline.core.errors import ConfigError

    folder = tmp_path / "model"
    _export("test_resnet", folder)
    head = load_file(str(folder / "dim_head.safetensors"))
    if change == "extra key":
        head["critic.weight"] = torch.zeros(2, 2)
    elif change == "missing key":
        head = {k: v for k, v in head.items() if not k.startswith("fc.")}
    else:  # the head of a run with twice the fc width
        other = DIMEncoder(
            ModelConfig("test_resnet", code_dim=8, fc_dim=32, img_size=32)
        ).state_dict()
        head = {k: v for k, v in other.items() if not k.startswith("backbone.")}
    save_file(head, str(folder / "dim_head.safetensors"))
    with pytest.raises(ConfigError, match=r"dim_head\.safetensors does not match 'test_resnet'"):
        load_encoder(folder)


def test_load_encoder_refuses_backbone_weights_of_another_architecture(tmp_path):
    """model.safetensors of another backbone than config.json names: one ConfigError
    naming the file and the backbone, not torch's RuntimeError with every key listed."""
    from safetensors.torch import save_file

    from pipeline.core.errors import ConfigError

    folder = tmp_path / "model"
    _export("test_resnet", folder)
    other = DIMEncoder(
        ModelConfig("dim_conv32", code_dim=8, fc_dim=16, img_size=32)
    ).backbone.state_dict()
    save_file(other, str(folder / "model.safetensors"))
    with pytest.raises(
        ConfigError, match=r"model\.safetensors does not hold the 'test_resnet'"
    ) as e:
        load_encoder(folder)
    assert len(str(e.value)) < 600
