"""What a command line does with a mistake, for the commands outside ``pipeline`` (the
benchmarks): one line ``PROG: error: ...`` on stderr and exit code 2, as the project's
own tools do, instead of a traceback from wherever the bad value was first used."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pipeline.core.errors import ConfigError, unknown

__all__ = ["comma_separated", "exit_on_mistake", "refused"]

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


def exit_on_mistake(prog: str, main: Callable[..., int | None], argv=None) -> NoReturn:
    """Run ``main(argv)``; a ``ConfigError`` (bad config, override, path or data) becomes
    one line and exit code 2."""
    try:
        code = main(argv)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
