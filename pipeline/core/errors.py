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


def state_dict_mismatch(err: RuntimeError, limit: int = 300) -> str:
    """The telling line of torch's ``load_state_dict`` error ("size mismatch for ...",
    "Missing key(s) ..."), shortened: for a one-line ConfigError instead of the whole dump."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
    if len(detail) > limit:
        detail = detail[:limit].rsplit(", ", 1)[0] + ", ..."
    return detail


def one_line(err: Exception) -> str:
    """A parser's message (YAML's spans lines, with a caret drawing) as one line: the
    problem and where it is."""
    lines = str(err).splitlines()
    problem = getattr(err, "problem", None) or (lines[0] if lines else type(err).__name__)
    mark = getattr(err, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem
