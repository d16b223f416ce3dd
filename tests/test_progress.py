"""The progress bar and console lines of a run (pipeline.train.progress): the online
probe's accuracies are printed once per probe and stay in the bar until the next."""

from __future__ import annotations

import time
from types import SimpleNamespace

from train_helpers import TINY, pretrain_cmd, run, write_shards

from pipeline.train.progress import Progress
from pipeline.train.run_folder import RunState

ROW = {"loss": 0.5, "samples_per_s_total": 100.0, "mi/local/infonce": 1.25}


class Rows:
    """A tracker that keeps what it is given."""

    def __init__(self):
        self.logged = []

    def log(self, row: dict, step: int) -> None:
        self.logged.append((step, row))


def test_probe_accuracies_get_a_line_and_stay_in_the_bar(capsys):
    """Catches: the probe's accuracies logged but never shown (the bar kept only the
    last row's MI), a line on every logged step, the bar losing them on the next row."""
    accelerator = SimpleNamespace(num_processes=1, is_main_process=True)
    tc = SimpleNamespace(batch_size=8, grad_accum=1, max_steps=10)
    tracker = Rows()
    state = RunState()
    with Progress(accelerator, tc, state, hidden=False, started=time.monotonic()) as p:
        p.advance()
        p.log(ROW | {"probe/knn": 0.912, "probe/linear": 0.9344}, tracker)
        shown = p.bar.postfix
        p.advance()
        p.log(dict(ROW), tracker)
        kept = p.bar.postfix
    lines = [line for line in capsys.readouterr().out.splitlines() if "probe" in line]
    assert lines == ["step 1: online probe knn 91.2%, linear 93.4%"]
    for postfix in (shown, kept):
        assert "knn=0.912" in postfix and "linear=0.934" in postfix and "infonce=1.250" in postfix
    assert [step for step, _ in tracker.logged] == [1, 2]
    assert "probe/knn" not in tracker.logged[1][1]  # the bar keeps it; the log does not


def test_a_run_prints_each_probe_and_no_deepspeed_notice(tmp_path):
    """A real run, DS_ACCELERATOR unset as on a user's machine. Catches: DeepSpeed's
    "Setting accelerator to CPU" warning back on stdout (accelerate imports DeepSpeed in
    every run), the probe's line missing from a real run's console."""
    shards = write_shards(tmp_path / "shards", n=128)
    data = (f"data.train_shards={shards}", f"data.val_shards={shards}")
    args = (f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_every=2")
    proc = run(
        pretrain_cmd(*TINY, *data, *args, "wandb.mode=disabled"),
        timeout=120,
        env_update={"DS_ACCELERATOR": None},
    )
    assert proc.returncode == 0
    assert "Setting accelerator" not in proc.stdout + proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if "online probe" in line]
    assert line.startswith("step 2: online probe knn ") and ", linear " in line
