"""The one exception type users see for bad configuration or bad input."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """Bad configuration or input, with a message that names the problem."""


def unknown(kind: str, value: str, choices: Iterable[str]) -> ConfigError:
    """ConfigError for a name not among ``choices``, with close matches suggested."""
    choices = sorted(choices)
    close = difflib.get_close_matches(str(value), choices, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    listed = ", ".join(choices) if len(choices) <= 20 else f"{len(choices)} names"
    return ConfigError(f"unknown {kind} {value!r}{hint} (choices: {listed})")


def choose(kind: str, name: str, table: Mapping[str, T]) -> T:
    """``table[name]``: how a registry is both checked and dispatched; an unknown name is
    the did-you-mean ConfigError, naming ``kind`` (the config key)."""
    try:
        return table[name]
    except KeyError:
        raise unknown(kind, name, table) from None
