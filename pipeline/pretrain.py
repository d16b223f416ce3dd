"""``pretrain.py`` / ``dim-pretrain``: the command line of a pretraining run.

``accelerate launch pretrain.py [--config FILE] [key=value ...]``: the config is loaded and
checked, the run's input is checked (``pipeline.train.preflight``), then ``pipeline.train.loop``
trains. Every mistake in the input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.config import describe, load_config
from pipeline.core.errors import ConfigError
from pipeline.core.schema import Config
from pipeline.train.loop import train
from pipeline.train.step import NonFiniteLoss
from pipeline.train.threads import for_config, restart_for_wait_policy

USAGE = """pretrain.py [--config FILE] [key=value ...]

Deep InfoMax pretraining. Configuration: the defaults below, then FILE (YAML), then the
dotted overrides; options and overrides may come in any order. Launch with
`accelerate launch [--config_file launch/X.yaml] pretrain.py` for several processes.
A run resumes from the latest checkpoint in train.output_dir; a folder holding a run
of another configuration is refused (see --force-config), and so is one that another
run is writing to. Ctrl-C saves at the end of the step; a second Ctrl-C quits unsaved.
"""


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    """(the config, whether --force-config was given)."""
    p = argparse.ArgumentParser(
        prog="pretrain.py",
        usage=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="keys (with defaults):\n" + describe(),
    )
    p.add_argument("--config", default=None, help="YAML file with any of the sections below")
    p.add_argument(
        "--force-config",
        action="store_true",
        help="continue the run in train.output_dir even though its saved "
        "config.yaml differs (the new config replaces it)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. train.batch_size=64 loss.estimator=jsd",
    )
    args = p.parse_intermixed_args(argv)  # options before, between or after the overrides
    return load_config(args.config, args.overrides), args.force_config


def quiet_third_party() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU" warning: accelerate imports DeepSpeed
    (when installed) on every run, DDP on CPU included, and DeepSpeed announces on stdout
    that it found no GPU. A filter, not a level: DeepSpeed sets its logger's level when
    imported, and its other warnings concern the user's run."""
    logging.getLogger("DeepSpeed").addFilter(
        lambda record: "Setting accelerator to CPU" not in record.getMessage()
    )


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad configuration exits with code 2 and one line, a run
    interrupted by a second Ctrl-C with 130 and one line."""
    quiet = os.environ.get("RANK", "0") != "0"
    quiet_third_party()
    try:
        cfg, force_config = parse_args(argv)
        if argv is None:  # the command itself: OpenMP's wait policy needs a restart
            restart_for_wait_policy(for_config(cfg))
        train(cfg, force_config)
    except ConfigError as err:
        if not quiet:
            print(f"pretrain.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as err:
        if not quiet:
            print(f"pretrain.py: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C (the first saves at the step's end)
        if not quiet:
            print(
                "pretrain.py: interrupted, not saved; run again to resume from the last "
                "checkpoint (a save cut short is removed then)",
                file=sys.stderr,
            )
        sys.exit(130)  # 128 + SIGINT, as a shell reports a process Ctrl-C ended


if __name__ == "__main__":
    main()
