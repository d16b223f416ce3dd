"""The run configuration's schema: typed dataclasses, their defaults and their range checks.

This is the one place the defaults live. Every field carries the line ``--help`` prints
(``help``) and, where the allowed values are a fixed set, those values (``choices``).
Names that pick from a registry (estimators, critics, augmentations, optimizers) are
checked where the registries are known, by ``pipeline.config``; nothing here imports
above ``pipeline.core.errors``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError, unknown

__all__ = [
    "Config",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "WandbConfig",
    "option",
    "save_config",
]

OFF = "none"  # a critic setting that turns its MI term off


def option(default: Any, help: str, *, choices: tuple[str, ...] = ()) -> Any:
    """A config field: its default, its ``--help`` line and (a fixed set) its allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _check(
    obj, section: str, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()
) -> None:
    """Every field's fixed choices, then ``> 0`` / ``>= 0`` for the names given: one line
    naming the key, its value and what is allowed."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("choices") and value not in f.metadata["choices"]:
            raise unknown(f"{section}.{f.name}", value, f.metadata["choices"])
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
    backbone: str = option(
        "dim_conv32", "any timm model name (dim_conv32: the DIM paper's 32 px encoder)"
    )
    pretrained: bool = option(
        False, "load timm's pretrained weights (never downloads unless asked)"
    )
    local_layer: int = option(1, "index into the backbone's feature stages (negative ok)")
    code_dim: int = option(64, "size of the global code z")
    fc_dim: int = option(1024, "hidden layer between backbone and (mu, logvar)")
    img_size: int = option(32, "input resolution (also sizes ViT position embeddings)")
    in_chans: int = option(3, "input channels")
    backbone_kwargs: dict = option({}, "extra timm.create_model keyword arguments")

    def __post_init__(self):
        _check(self, "model", positive=("code_dim", "fc_dim", "img_size", "in_chans"))


@dataclass
class LossConfig:
    """The defaults are the recipe that won on held-out data: DIM(L) infoNCE (with
    ``data.augment=amdim``), no prior; the table and evidence: docs/training.md, "The
    default recipe", and docs/results.md."""

    estimator: str = option("infonce", "MI estimator of both terms")
    global_critic: str = option("none", "critic of the global term (none: no global term)")
    global_input: str = option("pooled", "z's partner in the global term: pooled map or mu")
    local_critic: str = option("dot", "critic of the local term (none: no local term)")
    alpha: float = option(0.0, "weight of the global MI term")
    beta: float = option(1.0, "weight of the mean local MI term")
    gamma: float = option(0.0, "weight of E[KL(N(mu, sigma^2) || N(0, I))], the prior on the code")
    critic_dim: int = option(
        64, "embedding size of dot critics (256/512 was within noise of 64/128, at ~1.4x FLOPs)"
    )
    critic_hidden: int = option(
        128,
        "hidden width of every critic MLP; 0: dot critics embed linearly (concat needs > 0)",
    )
    local_positions: int = option(
        0,
        "local-map locations scored per image and view, drawn afresh each step (0: all); "
        "fewer makes the local critic cheaper",
    )
    critic_temperature: float = option(
        0.0, "dot critics: score cos(f(a), g(b)) / temperature if > 0 (0: f(a) . g(b) / sqrt(dim))"
    )
    tclip: float = option(10.0, "soft score clip tclip*tanh(s/tclip) (AMDIM); 0 disables")
    score_penalty: float = option(
        0.05, "weight of mean(score^2): keeps scores off the clip (AMDIM)"
    )
    allow_negative_weights: bool = option(
        False, "allow a negative alpha/beta/gamma (which minimises that term)"
    )

    def __post_init__(self):
        weights = () if self.allow_negative_weights else ("alpha", "beta", "gamma")
        _check(
            self,
            "loss",
            positive=("critic_dim",),
            non_negative=(
                *weights,
                "critic_hidden",
                "critic_temperature",
                "local_positions",
                "tclip",
                "score_penalty",
            ),
        )
        if self.global_critic == OFF and self.local_critic == OFF:
            raise ConfigError(
                "loss.global_critic and loss.local_critic are both 'none': "
                "nothing would estimate mutual information"
            )


@dataclass
class DataConfig:
    train_shards: str = option(
        "",
        "brace pattern, comma list, or a prepare manifest; empty: the embedded default "
        "(digits, written on first use)",
    )
    val_shards: str = option("", "held-out shards for the online probe")
    epoch_samples: int = option(0, "samples per epoch across all ranks (0: from the manifest)")
    num_workers: int = option(2, "DataLoader workers per process (0: read in the main process)")
    shuffle_buffer: int = option(2000, "samples (undecoded) in the shuffle buffer; < 2 disables")
    augment: str = option("amdim", "augmentation recipe (amdim: two independent views)")
    views: int = option(
        0,
        "independently augmented views per image; 0: the recipe's own (amdim 2, simple 1). "
        "With more than two, every view's code is scored against every other view's features",
    )
    augment_on: str = option(
        "batch",
        "batch: workers decode, the train loop augments the batch on its device; "
        "worker: per-image transforms in the workers",
        choices=("batch", "worker"),
    )
    decode_on: str = option(
        "cpu",
        "cpu: loader workers decode; device: JPEG bytes go to the training device and are "
        "decoded there in batches (nvJPEG), then augmented with augment_on=batch; the CPU "
        "path where no CUDA exists",
        choices=("cpu", "device"),
    )
    jpeg_draft: bool = option(
        True,
        "decode a large JPEG at 1/2, 1/4 or 1/8 scale (PIL's draft mode) when every crop "
        "still has at least img_size pixels a side",
    )
    crop_scale_min: float = option(0.5, "RandomResizedCrop's lower area bound, in (0, 1]")
    flip: bool = option(True, "random horizontal flips")
    color_jitter: float = option(0.4, "colour jitter strength; 0 disables")
    label_key: str = option(
        "auto", "where labels live: auto (.cls, else .json 'label') | cls | json:<field> | none"
    )
    max_bad_streak: int = option(1000, "bad samples or shards in a row that stop a run")

    def __post_init__(self):
        _check(
            self,
            "data",
            positive=("max_bad_streak",),
            non_negative=(
                "epoch_samples",
                "num_workers",
                "shuffle_buffer",
                "color_jitter",
                "views",
            ),
        )
        if not 0 < self.crop_scale_min <= 1:
            raise ConfigError(f"data.crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
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
    output_dir: str = option("runs/default", "the run folder: checkpoints, metrics, export")
    batch_size: int = option(128, "images per process per micro-batch")
    max_steps: int = option(1000, "optimizer steps of the whole run (with max_minutes: at most)")
    max_minutes: float = option(
        0.0,
        "time budget of the run in minutes (0: none): the run plans its length from its own "
        "pace, at most max_steps, and its cosine schedule ends with the budget",
    )
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(1e-5, "decoupled weight decay (not on norms and biases)")
    warmup_steps: int = option(100, "linear warm-up steps before the cosine decay")
    optimizer: str = option("adamw", "adamw | lars (timm's; trust ratio on the decayed weights)")
    betas: list = option([0.9, 0.999], "AdamW's betas (the DIM paper: 0.5, 0.999)")
    grad_clip: float = option(1.0, "max gradient norm; 0 disables")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    mixed_precision: str = option(
        "no",
        "autocast precision (accelerate's); auto: bf16 where the device computes it "
        "natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX), else no",
        choices=("no", "bf16", "fp16", "auto"),
    )
    compile: bool = option(False, "torch.compile the encoder and the objective (in place)")
    channels_last: bool = option(False, "NHWC weights and inputs (faster convolutions on GPUs)")
    keep_freed_memory: bool = option(
        True,
        "glibc malloc keeps freed activations for the next step instead of unmapping "
        "them (CPU steps ~10% faster; RSS stays at its peak)",
    )
    threads: int = option(
        0,
        "intra-op CPU threads per process; 0: OMP_NUM_THREADS if set, else the cores this "
        "process may use (affinity mask, SLURM_CPUS_PER_TASK) / local processes - loader workers",
    )
    seed: int = option(0, "seed of weights, data order, augmentation and negatives")
    log_every: int = option(10, "steps between logged rows")
    save_every: int = option(500, "steps between checkpoints")
    keep_last: int = option(2, "checkpoints kept")
    eval_every: int = option(0, "online k-NN / linear probe period in steps (0: off)")
    export_checkpoints: bool = option(
        False, "also write a model folder (export/) in each checkpoint"
    )

    def __post_init__(self):
        _check(
            self,
            "train",
            positive=("lr", "batch_size", "max_steps", "grad_accum", "log_every", "save_every"),
            non_negative=(
                "weight_decay",
                "max_minutes",
                "warmup_steps",
                "grad_clip",
                "keep_last",
                "eval_every",
                "threads",
            ),
        )
        if self.batch_size < 2:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is too small: each process needs at "
                f"least 2 images per step, for BatchNorm's statistics and for negatives"
            )
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"train.warmup_steps={self.warmup_steps} is longer than the run "
                f"(train.max_steps={self.max_steps}); give train.warmup_steps <= "
                f"{self.max_steps}"
            )
        if self.optimizer == "lars" and self.weight_decay == 0:
            raise ConfigError(
                "train.optimizer=lars needs train.weight_decay > 0: timm's Lars adapts the "
                "rate of decayed weights only, so with 0 it would be plain momentum SGD"
            )
        if len(self.betas) != 2 or not all(
            isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas
        ):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass
class WandbConfig:
    mode: str = option(
        "auto",
        "auto: online if an API key is set, else offline",
        choices=("auto", "online", "offline", "disabled"),
    )
    project: str = option("dim-pretrain", "W&B project")
    entity: str = option("", "W&B entity (team or user); empty: the key's default")
    name: str = option("", "W&B run name; empty: W&B's")
    tags: list = option([], "W&B run tags")

    def __post_init__(self):
        _check(self, "wandb")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML, in the schema's key order (what ``load_config`` reads)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
