"""Typed configuration: YAML + dotted overrides, one clear error for bad keys and values."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import describe, load_config
from pipeline.core.errors import ConfigError
from pipeline.core.schema import Config, save_config


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 32\n  lr: 1\nloss:\n  estimator: jsd\n")
    cfg = load_config(
        path, ["train.batch_size=8", "model.backbone_kwargs={patch_size: 4}", "wandb.tags=[a,b]"]
    )
    assert cfg.train.batch_size == 8 and cfg.loss.estimator == "jsd"
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.model.backbone_kwargs == {"patch_size": 4} and cfg.wandb.tags == ["a", "b"]
    assert cfg.model == Config().model.__class__(backbone_kwargs={"patch_size": 4})


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["loss.estimator=dv", "train.max_steps=7", "train.warmup_steps=3"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["train.batchsize=3"],
            "unknown config key 'train.batchsize'; did you mean 'train.batch_size'",
        ),
        (["trian.batch_size=3"], "unknown config key 'trian'"),
        (["train.batch_size=three"], "train.batch_size expects int"),
        (["train.batch_size=0"], "train.batch_size must be > 0"),
        (["train.mixed_precision=fp8"], "unknown train.mixed_precision 'fp8'"),
        (["loss.estimator=nce"], "unknown loss.estimator 'nce'"),
        (["loss=3"], "loss is a section"),
        (["train.batch_size"], "not of the form"),
        (["loss.global_critic=none", "loss.local_critic=none"], "nothing would estimate"),
        (["train.lr=-1"], "train.lr must be > 0, got -1.0"),
        (["train.lr=.nan"], "train.lr must be a finite number"),
        (["loss.alpha=-1"], "loss.alpha must be >= 0, got -1.0"),
        (["loss.gamma=-0.5"], "loss.gamma must be >= 0"),
        (
            ["train.batch_size=8", "train.batch_size.x=3"],
            "train.batch_size is a single value, not a section",
        ),
        (["train.batch_size.x=3"], "train.batch_size is a single value, not a section"),
        (["model.code_dim=0"], "model.code_dim must be > 0"),
        (["train.compile=yes"], "train.compile expects true or false, got 'yes'"),
    ],
)
def test_bad_input_is_one_config_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_yaml_words_no_and_off_stay_strings(tmp_path):
    """YAML 1.1 reads ``no`` as False; accelerate's mixed_precision value "no" must arrive
    as the string, from the command line and from a file alike."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n  compile: true\n")
    cfg = load_config(path)
    assert (cfg.train.mixed_precision, cfg.train.compile) == ("no", True)


def test_negative_weights_need_the_explicit_flag():
    cfg = load_config(None, ["loss.alpha=-1", "loss.allow_negative_weights=true"])
    assert cfg.loss.alpha == -1.0


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_describe_lists_every_key_with_its_default():
    text = describe()
    for key in (
        "data.train_shards=",
        "train.batch_size=128",
        "train.max_steps=",
        "train.output_dir=",
        "model.backbone=",
        "loss.estimator=infonce",
        "train.save_every=",
        "train.seed=0",
    ):
        assert key in text


# ------------------------------------------------------------------ registries


def test_a_name_added_to_a_registry_is_accepted_and_dispatched(monkeypatch):
    """One table per choice: config validation and dispatch read the same dict. Bug
    caught: the config keeping its own list of names beside the table the code uses."""
    import torch

    from pipeline.objective import loss as objective
    from pipeline.objective.critics import DotCritic
    from pipeline.train import optim

    seen = []

    def mine(critic, ea, eb, tclip, generator):
        seen.append((ea.shape, eb.shape))
        return objective.Estimate(*(torch.zeros(()),) * 4)

    monkeypatch.setitem(objective.ESTIMATORS, "mine", objective.Estimator(lambda ea: ea, mine))
    monkeypatch.setitem(optim.OPTIMIZERS, "plain_sgd", lambda groups, cfg: torch.optim.SGD(groups))
    cfg = load_config(None, ["loss.estimator=mine", "train.optimizer=plain_sgd"])
    critic = DotCritic(3, 5, dim=4, hidden=0)
    objective.mi_estimate(cfg.loss.estimator, critic, torch.randn(2, 3), torch.randn(2, 5))
    assert seen == [(torch.Size([2, 4]), torch.Size([2, 4]))]
    model = torch.nn.Linear(2, 2)
    assert isinstance(optim.build_optimizer(model, cfg.train), torch.optim.SGD)


@pytest.mark.parametrize(
    "call,message",
    [
        ("critic", "unknown loss.local_critic 'bilinear'"),
        ("estimator", "unknown loss.estimator 'nce'"),
    ],
)
def test_dispatch_refuses_names_it_does_not_know(call, message):
    """Bug caught: build_critic built a concat critic for any name it did not know."""
    import torch

    from pipeline.core.schema import LossConfig
    from pipeline.objective.critics import DotCritic
    from pipeline.objective.loss import build_critic, mi_estimate

    with pytest.raises(ConfigError, match=message):
        if call == "critic":
            build_critic("bilinear", 4, 4, LossConfig(), local=True)
        else:
            mi_estimate("nce", DotCritic(2, 2, dim=2, hidden=0), torch.ones(2, 2), torch.ones(2, 2))


def test_yaml_mistakes_are_one_line_with_where(tmp_path):
    """Bug caught: a YAML error (an override cut at a space by the shell, a broken file)
    came out as PyYAML's several lines with a caret drawing."""
    with pytest.raises(ConfigError) as override:
        load_config(None, ["model.backbone_kwargs={drop_rate:"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError) as file:
        load_config(bad)
    for err, where in ((override, "line 1"), (file, "line 3")):
        assert "\n" not in str(err.value) and where in str(err.value), str(err.value)


RECIPE_START, RECIPE_END = "<!-- recipe:start -->", "<!-- recipe:end -->"


def _documented_recipe() -> dict[str, str]:
    """docs/training.md's recipe table: ``{"loss.estimator": "infonce", ...}``."""
    text = (Path(__file__).parents[1] / "docs/training.md").read_text()
    block = text[text.index(RECIPE_START) + len(RECIPE_START) : text.index(RECIPE_END)]
    rows = [line.split("|")[1:3] for line in block.strip().splitlines()[2:]]
    return {key.strip(" `"): value.strip(" `") for key, value in rows}


def test_defaults_are_the_documented_recipe():
    """Catches a default changed in the schema without the docs (or the reverse)."""
    recipe = _documented_recipe()
    assert {"loss.estimator", "loss.gamma", "data.augment"} <= set(recipe)
    cfg = load_config(None)
    for key, documented in recipe.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        assert value == yaml.safe_load(documented), (key, value, documented)


# Configs that exist to differ: the seed write-up's objective, and the DIM paper's
# un-augmented CIFAR-10 training.
REPRODUCTIONS = {
    "cifar10_seed.yaml": set(_documented_recipe()),
    "cifar10_gpu.yaml": {"data.augment"},
}


def test_dataset_configs_inherit_the_recipe():
    """configs/*.yaml change what their data needs, not the objective."""
    recipe = _documented_recipe()
    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        restated = {k for k in recipe if k.split(".")[1] in raw.get(k.split(".")[0], {})}
        assert restated <= REPRODUCTIONS.get(path.name, set()), f"{path.name} sets {restated}"


def test_views_with_a_non_random_augment_are_refused_at_load():
    """augment=none builds no augmentation, so the refusal must come from the config
    itself, or data.views would be silently ignored."""
    with pytest.raises(ConfigError, match="needs a random"):
        load_config(None, ["data.views=3", "data.augment=none"])
    assert load_config(None, ["data.views=3", "data.augment=simple"]).data.views == 3
