"""The run configuration as the entry points read it: YAML, ``key=value``, ``--help``.

``load_config(path, ["train.batch_size=64", "loss.estimator=jsd"])`` starts from the
schema's defaults (``pipeline.core.schema``: the embedded default run), applies the YAML
file, then the dotted overrides, and checks the names that pick from a registry
(estimators, critics, augmentations, optimizers). Unknown keys and values of the wrong
type are one ``ConfigError`` that names the key; values are parsed as YAML scalars, so
``train.lr=3e-4`` is a float and ``data.train_shards=[a.tar,b.tar]`` a list.

The checks are written here rather than delegated to pydantic (installed with deepspeed),
measured as a replacement for ``_coerce`` / ``_merge`` / ``_build``: by default it accepts
unknown keys silently (``train.batch_sise=3``) and ``true`` as an integer, and reports in
several lines with a URL. Forbidding extras per dataclass, strict booleans and a translator
back to one did-you-mean line would take about the lines it saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import textwrap
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ConfigError, one_line, unknown
from pipeline.core.schema import OFF, Config
from pipeline.data.augment import AUGMENTS, view_count
from pipeline.objective.critics import CRITICS
from pipeline.objective.loss import ESTIMATORS, GLOBAL_INPUTS
from pipeline.train.optim import OPTIMIZERS

__all__ = ["NAMED", "check_names", "describe", "load_config", "parse_overrides", "read_yaml"]

# Keys whose value names an entry of a registry: the allowed values are its keys.
NAMED: dict[str, Collection[str]] = {
    "loss.estimator": ESTIMATORS,
    "loss.global_critic": (*CRITICS, OFF),
    "loss.global_input": GLOBAL_INPUTS,
    "loss.local_critic": (*CRITICS, OFF),
    "data.augment": AUGMENTS,
    "train.optimizer": OPTIMIZERS,
}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only ``true`` / ``false``. YAML 1.1
    also reads yes / no / on / off as booleans, which turned accelerate's
    ``train.mixed_precision=no`` into False and refused it as not a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(text: str) -> Any:
    """A config file's or an override's YAML, with ``_Loader``'s booleans."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds no Python objects


def check_names(cfg: Config) -> None:
    """Every registry-named value exists (did-you-mean otherwise), the views per image
    suit the augmentation, and the critics' hidden width and temperature suit the critics
    chosen."""
    for key, choices in NAMED.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise unknown(key, value, choices)
    # Here, not only where views are drawn: with augment=none no augmentation is built,
    # and data.views would be ignored instead of refused.
    view_count(cfg.data)
    loss = cfg.loss
    used = {c: CRITICS[c] for c in (loss.global_critic, loss.local_critic) if c in CRITICS}
    mlps = [name for name, critic in used.items() if critic.needs_hidden]
    if loss.critic_hidden == 0 and mlps:
        raise ConfigError(
            f"loss.critic_hidden=0 (linear embeddings) works with dot critics "
            f"only; {mlps[0]!r} needs a hidden layer"
        )
    if loss.critic_temperature > 0 and not any(c.takes_temperature for c in used.values()):
        raise ConfigError(
            "loss.critic_temperature sets the dot critics' cosine scores, but neither "
            "loss.global_critic nor loss.local_critic is 'dot'"
        )


def describe(cfg: Config | None = None, width: int = 100) -> str:
    """``--help``'s key list: each key with its default, then its description and, where
    the values are a fixed set or a registry's names, the allowed ones."""
    cfg = cfg or Config()
    lines = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            key = f"{section.name}.{f.name}"
            value = yaml.safe_dump(getattr(sub, f.name), default_flow_style=True)
            lines.append(f"  {key}={value.strip().removesuffix('...').strip()}")
            choices = NAMED.get(key) or f.metadata.get("choices")
            text = f.metadata.get("help", "")
            if choices:
                text += f" [{' | '.join(choices)}]"
            lines += textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


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
        expected = "true or false" if target is bool else target.__name__
        raise ConfigError(f"{key} expects {expected}, got {value!r} ({type(value).__name__})")
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
            value = read_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {key}: cannot parse value {raw!r}: {one_line(err)}"
            ) from None
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
            loaded = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {one_line(err)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        data = loaded
    data = _deep_update(data, parse_overrides(overrides or []))
    checked = _merge(Config(), data, "")
    try:
        cfg = _build(Config, checked)
    except TypeError as err:  # a dataclass rejected a value in __post_init__
        raise ConfigError(str(err)) from None
    check_names(cfg)
    return cfg
