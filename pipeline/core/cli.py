"""What a command line does with a mistake: one line ``PROG: error: ...`` on stderr and
exit code 2, instead of a traceback from wherever the bad value was first used. The
project's tools (``one_line_mistakes`` on their ``main``) and the benchmarks
(``exit_on_mistake``) share it."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pipeline.core.errors import ConfigError, unknown

__all__ = ["comma_separated", "exit_on_mistake", "one_line_mistakes", "refused"]

_WHAT = {int: "an integer", float: "a number"}


def comma_separated(
    convert: Callable[[str], Any] = str, choices: Sequence[str] = (), kind: str = "name"
):
    """An argparse ``type`` for ``"a,b,c"``: a list, each item converted (and, given
    ``choices``, one of them, else a did-you-mean naming the ``kind``); a bad item is
    argparse's usage error naming it."""

    def parse(text: str) -> list:
        items = []
        for raw in filter(None, (s.strip() for s in text.split(","))):
            try:
                item = convert(raw)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{raw!r} is not {_WHAT.get(convert, 'a valid value')}"
                ) from None
            if choices and item not in choices:
                raise argparse.ArgumentTypeError(str(unknown(kind, item, choices)))
            items.append(item)
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r} names nothing")
        return items

    parse.__name__ = "comma-separated list"  # what argparse calls the type in its message
    return parse


def refused(output: str, note: str = "") -> ConfigError:
    """A command the benchmark started exited 2 (it refused its input): its last line,
    the one naming the mistake, as the benchmark's own ``ConfigError``."""
    lines = [line for line in output.splitlines() if line.strip()]
    return ConfigError((lines[-1] if lines else "a command refused its input") + note)


def one_line_mistakes(prog: str):
    """Decorator for a command's ``main``: a ``ConfigError`` (bad config, override, path or
    data) it raises becomes one stderr line ``PROG: error: ...`` and the return code 2."""

    def wrap(main: Callable[..., int | None]) -> Callable[..., int | None]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int | None:
            try:
                return main(*args, **kwargs)
            except ConfigError as err:
                print(f"{prog}: error: {err}", file=sys.stderr)
                return 2

        return run

    return wrap


def exit_on_mistake(prog: str, main: Callable[..., int | None], argv=None) -> NoReturn:
    """Run ``main(argv)`` and exit with its code; a mistake as ``one_line_mistakes``."""
    sys.exit(one_line_mistakes(prog)(main)(argv) or 0)
