"""Typed run configuration: dataclasses, loaded from YAML, overridden by ``key=value``.

``load_config(path, ["train.batch_size=64", "loss.estimator=jsd"])`` starts from the
defaults below (the embedded default run), applies the YAML file, then the dotted
overrides. Unknown keys and values of the wrong type are one ``ConfigError`` that names
the key; values are parsed as YAML scalars, so ``train.lr=3e-4`` is a float and
``data.train_shards=[a.tar,b.tar]`` a list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .augment import AUGMENTS
from .critics import CRITICS
from .errors import ConfigError, unknown
from .objective import ESTIMATORS, GLOBAL_INPUTS
from .optim import OPTIMIZERS

OFF = {"none": None}  # a critic setting that turns its MI term off
# loss.global_critic's old one-word values -> (loss.global_input, loss.global_critic)
LEGACY_GLOBAL_CRITICS = {"zz": ("mu", "concat"), "feature": ("pooled", "concat")}


def _choice(section: str, name: str, value: str, choices: Collection[str]) -> None:
    """``value`` is one of ``choices``: a registry's keys, or a tuple of names."""
    if value not in choices:
        raise unknown(f"{section}.{name}", value, choices)


def _bounds(
    obj, section: str, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()
) -> None:
    """One line naming the key, its value and what is allowed, for out-of-range numbers."""
    for names, ok, allowed in (
        (positive, lambda v: v > 0, "> 0"),
        (non_negative, lambda v: v >= 0, ">= 0"),
    ):
        for name in names:
            value = getattr(obj, name)
            if not ok(value):
                raise ConfigError(f"{section}.{name} must be {allowed}, got {value!r}")


@dataclass
class ModelConfig:
    backbone: str = "dim_conv32"  # any timm model name (dim_conv32: the DIM paper's 32 px encoder)
    pretrained: bool = False  # never downloads unless asked
    local_layer: int = 1  # index into the backbone's feature stages (negative ok)
    code_dim: int = 64  # size of the global code z
    fc_dim: int = 1024  # hidden layer between backbone and (mu, logvar)
    img_size: int = 32  # input resolution (also sizes ViT position embeddings)
    in_chans: int = 3
    backbone_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs

    def __post_init__(self):
        _bounds(self, "model", positive=("code_dim", "fc_dim", "img_size", "in_chans"))


@dataclass
class LossConfig:
    estimator: str = "infonce"  # jsd | dv | infonce
    global_critic: str = "dot"  # concat | dot | none (no global MI term)
    global_input: str = "pooled"  # what the global critic pairs with z: pooled (the local
    # map's spatial mean) | mu (the code's mean; with concat, the old "zz")
    local_critic: str = "dot"  # concat | dot | none
    alpha: float = 0.5  # weight of the global MI term
    beta: float = 1.0  # weight of the mean local MI term
    gamma: float = 0.1  # weight of E[KL(N(mu, sigma^2) || N(0, I))]
    critic_dim: int = 64  # embedding size of dot critics (256/512 was within noise of
    # 64/128 in the ablation, docs/results.md, at ~1.4x the FLOPs)
    critic_hidden: int = 128  # hidden width of every critic MLP; 0: dot critics embed
    # linearly (cheapest local critic), concat ones need > 0
    tclip: float = 10.0  # soft score clip tclip*tanh(s/tclip) (AMDIM); 0 disables
    score_penalty: float = 0.05  # weight of mean(score^2): keeps scores off the clip (AMDIM)
    allow_negative_weights: bool = False  # a negative alpha/beta/gamma minimises a term

    def __post_init__(self):
        weights = () if self.allow_negative_weights else ("alpha", "beta", "gamma")
        _bounds(
            self,
            "loss",
            positive=("critic_dim",),
            non_negative=(*weights, "critic_hidden", "tclip", "score_penalty"),
        )
        _choice("loss", "estimator", self.estimator, ESTIMATORS)
        if self.global_critic in LEGACY_GLOBAL_CRITICS:  # built directly, not by load_config
            raise ConfigError(_new_spelling(self.global_critic))
        _choice("loss", "global_critic", self.global_critic, {**CRITICS, **OFF})
        _choice("loss", "global_input", self.global_input, GLOBAL_INPUTS)
        _choice("loss", "local_critic", self.local_critic, {**CRITICS, **OFF})
        critics = (self.global_critic, self.local_critic)
        mlps = [c for c in critics if c in CRITICS and CRITICS[c].needs_hidden]
        if self.critic_hidden == 0 and mlps:
            raise ConfigError(
                f"loss.critic_hidden=0 (linear embeddings) works with dot critics "
                f"only; {mlps[0]!r} needs a hidden layer"
            )
        if self.global_critic == "none" and self.local_critic == "none":
            raise ConfigError(
                "loss.global_critic and loss.local_critic are both 'none': "
                "nothing would estimate mutual information"
            )


@dataclass
class DataConfig:
    train_shards: str = ""  # brace pattern, comma list, or a prepare.py manifest;
    # empty: the embedded default (digits, written on first use)
    val_shards: str = ""  # held-out shards for the online probe
    epoch_samples: int = 0  # samples per epoch across all ranks (0: from manifest)
    num_workers: int = 2  # DataLoader workers per process (0: read in the main process)
    shuffle_buffer: int = 2000  # samples (undecoded) in the shuffle buffer; < 2 disables
    augment: str = "simple"  # none | simple | amdim (two independent views)
    augment_on: str = "batch"  # batch: workers decode, the train loop augments the batch
    # on its device | worker: per-image transforms in workers
    crop_scale_min: float = 0.5  # RandomResizedCrop lower area bound
    flip: bool = True
    color_jitter: float = 0.4  # strength; 0 disables
    label_key: str = "auto"  # auto (.cls, else .json "label") | cls | json:<field> | none
    max_bad_streak: int = 1000  # bad samples or shards in a row that stop a run

    def __post_init__(self):
        _choice("data", "augment", self.augment, AUGMENTS)
        _choice("data", "augment_on", self.augment_on, ("batch", "worker"))
        if not 0 < self.crop_scale_min <= 1:
            raise ConfigError(f"data.crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        for name in ("epoch_samples", "num_workers", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        _bounds(self, "data", positive=("max_bad_streak",))
        self.check_label_key(self.label_key)

    @staticmethod
    def check_label_key(label_key: str) -> str:
        """Where labels live: ``auto``, ``cls``, ``none`` or ``json:<field>`` (dots nest)."""
        if label_key in ("auto", "cls", "none") or (
            label_key.startswith("json:") and label_key[5:]
        ):
            return label_key
        raise ConfigError(
            f"data.label_key must be auto, cls, none or json:<field>, got {label_key!r}"
        )


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    batch_size: int = 128  # per process
    max_steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    optimizer: str = "adamw"  # adamw | lars (timm's; trust ratio on the decayed weights)
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW's (the DIM paper: 0.5, 0.999)
    grad_clip: float = 1.0  # max grad norm; 0 disables
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    compile: bool = False  # torch.compile the encoder and the objective (in place)
    channels_last: bool = False  # NHWC weights and inputs (faster convolutions on GPUs)
    keep_freed_memory: bool = True  # glibc malloc keeps freed activations for the next
    # step instead of unmapping them (CPU steps ~10% faster; RSS stays at its peak)
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2  # checkpoints kept
    eval_every: int = 0  # online k-NN probe period in steps (0: off)
    export_checkpoints: bool = False  # also write a model folder (export/) in each checkpoint

    def __post_init__(self):
        _choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        if self.optimizer == "lars" and self.weight_decay == 0:
            raise ConfigError(
                "train.optimizer=lars needs train.weight_decay > 0: timm's Lars adapts the "
                "rate of decayed weights only, so with 0 it would be plain momentum SGD"
            )
        _choice("train", "mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _bounds(
            self,
            "train",
            positive=("lr", "batch_size", "max_steps", "grad_accum", "log_every", "save_every"),
            non_negative=("weight_decay", "warmup_steps", "grad_clip", "keep_last", "eval_every"),
        )
        if len(self.betas) != 2 or not all(
            isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas
        ):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online if an API key is set) | online | offline | disabled
    project: str = "dim-pretrain"
    entity: str = ""
    name: str = ""
    tags: list = field(default_factory=list)

    def __post_init__(self):
        _choice("wandb", "mode", self.mode, ("auto", "online", "offline", "disabled"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading and checking


def _new_spelling(old: str) -> str:
    global_input, critic = LEGACY_GLOBAL_CRITICS[old]
    return (
        f"loss.global_critic={old} is the old spelling of "
        f"loss.global_input={global_input} loss.global_critic={critic}"
    )


def upgrade(data: dict) -> list[str]:
    """Rewrite old spellings in a config mapping, in place, to the current keys; one line
    per rewrite, saying the new spelling. Config files and run folders written before the
    global critic became two settings keep loading (the critic built is the same).

    Only ``loss.global_critic`` has changed: ``zz`` (concat critic on mu) and ``feature``
    (concat critic on the pooled local map). A ``loss.global_input`` that contradicts the
    old word is a ConfigError.
    """
    loss = data.get("loss")
    old = loss.get("global_critic") if isinstance(loss, dict) else None
    if not isinstance(old, str) or old not in LEGACY_GLOBAL_CRITICS:
        return []
    global_input, critic = LEGACY_GLOBAL_CRITICS[old]
    given = loss.get("global_input", global_input)
    if given != global_input:
        raise ConfigError(f"{_new_spelling(old)}, but loss.global_input={given} is also given")
    loss.update(global_input=global_input, global_critic=critic)
    return [_new_spelling(old)]


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type; ints are accepted where floats are."""
    target = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}.get(
        annotation, annotation
    )
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if target is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if isinstance(value, dict) and target is not dict:
        raise ConfigError(
            f"{key} is a single value, not a section: give it a "
            f"{getattr(target, '__name__', target)}, got {value!r}"
        )
    if target is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if target is list and isinstance(value, str):
        return [v for v in value.split(",") if v]
    if isinstance(target, type) and (
        not isinstance(value, target) or (target is int and isinstance(value, bool))
    ):
        raise ConfigError(
            f"{key} expects {target.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _merge(section_obj, data: dict, prefix: str) -> dict:
    """Return ``data`` checked against ``section_obj``'s dataclass (recursively)."""
    out = {}
    fields = _fields(section_obj)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise unknown("config key", dotted, [f"{prefix}{k}" for k in fields])
        current = getattr(section_obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} is a section; give it a mapping, got {value!r}")
            out[key] = _merge(current, value, dotted + ".")
        else:
            out[key] = _coerce(dotted, value, fields[key].type)
    return out


def _build(cls, data: dict):
    kwargs = {}
    for name, f in _fields(cls).items():
        if name not in data:
            continue
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        kwargs[name] = (
            _build(type(sub), data[name]) if dataclasses.is_dataclass(sub) else data[name]
        )
    return cls(**kwargs)


def _deep_update(base: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "backbone_kwargs":
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "a.c=x"]`` -> ``{"a": {"b": 1, "c": "x"}}`` with YAML-typed values."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {err}") from None
        node = tree
        *parents, leaf = key.strip().split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # "a.b=1 a.b.c=2": a.b was given a value
                raise ConfigError(
                    f"override {key}: {'.'.join(parents[: depth + 1])} is a "
                    f"single value, not a section"
                )
        node[leaf] = value
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated into a ``Config``."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        data = loaded
    data = _deep_update(data, parse_overrides(overrides or []))
    for line in upgrade(data):
        warnings.warn(f"{line}; the old spelling will stop working", FutureWarning, stacklevel=2)
    checked = _merge(Config(), data, "")
    try:
        return _build(Config, checked)
    except TypeError as err:  # a dataclass rejected a value in __post_init__
        raise ConfigError(str(err)) from None


def describe(cfg: Config | None = None) -> str:
    """One line per key with its default, for ``--help``."""
    cfg = cfg or Config()
    lines = []
    for section, sub in dataclasses.asdict(cfg).items():
        for key, value in sub.items():
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            lines.append(f"  {section}.{key}={text.removesuffix('...').strip()}")
    return "\n".join(lines)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
