"""The benchmarks keep the tools' promise about mistakes: one line ``PROG: error: ...``
naming the problem, exit code 2, no traceback, nothing written. Each script runs
in-process as ``__main__`` (``runpy``), so its real entry point is what is tested."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``python benchmarks/NAME argv``."""
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(BENCH / name), *argv]
    sys.path.insert(0, str(BENCH))  # as `python benchmarks/NAME` would have it
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(BENCH / name), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return done.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "script,argv,words",
    [
        ("step_overhead.py", ["--config", "nope.yaml"], "config file not found: nope.yaml"),
        ("step_overhead.py", ["--before", "foo"], "'foo' is not of the form section.key"),
        ("step_overhead.py", ["--sizes", "32,x"], "--sizes: 'x' is not an integer"),
        ("step_overhead.py", ["train.bogus=1"], "unknown config key 'train.bogus'"),
        ("input_vs_step.py", ["--places", "wroker"], "did you mean 'worker'"),
        ("data_throughput.py", ["--tar", "/nope.tar"], "/nope.tar not found"),
        ("data_throughput.py", ["--workers", "a"], "--workers: 'a' is not an integer"),
        ("decode.py", ["--grain", "0,z"], "--grain: 'z' is not a number"),
        ("infonce_memory.py", ["--sizes", ""], "--sizes: '' names nothing"),
        ("threads.py", ["--settings", "befor"], "unknown setting 'befor'"),
        ("ablation.py", ["--set", "train.bogus=1"], "unknown config key 'train.bogus'"),
        ("ablation.py", ["--train-shards", "/nope.json"], "shard manifest not found"),
        ("defaults_across_data.py", ["--only", "digts"], "did you mean 'digits'"),
        ("defaults_across_data.py", ["--set", "loss.gama=0"], "did you mean 'loss.gamma'"),
    ],
)
def test_benchmark_mistake_is_one_line_and_writes_nothing(script, argv, words, tmp_path, capsys):
    out = tmp_path / "out"
    if script in ("ablation.py", "defaults_across_data.py"):
        argv = [*argv, "--out", str(out)]
    code, err = run_script(script, argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith(f"{script}: error: ") and words in last, last
    assert not out.exists()
