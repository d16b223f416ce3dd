"""slurm/dim.sh with fake `scontrol`, `srun` and `accelerate` on PATH: which commands run,
with which arguments, and what a signal does (dry run, a normal run, a failed run, a
preemption)."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_helpers import ROOT

SCRIPT = ROOT / "slurm" / "dim.sh"

FAKES = {
    # hostnames of the allocation; anything else (requeue) is recorded
    "scontrol": (
        '#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then printf "%s\\n" $FAKE_HOSTS;\n'
        'else echo "scontrol $*" >> "$FAKE_LOG"; fi\n'
    ),
    # srun: record its arguments, run the task's `bash -c` string as node 0 and pass
    # SIGTERM on to it, as srun does
    "srun": (
        '#!/bin/bash\n{ printf srun; printf \' %q\' "$@"; echo; } >> "$FAKE_LOG"\n'
        'for a in "$@"; do last="$a"; done\n'
        'SLURM_NODEID=0 bash -c "$last" & child=$!\n'
        "trap 'kill -TERM $child' TERM\nwait $child; wait $child\n"
    ),
    # accelerate: record its arguments; exit with $FAKE_EXIT, or train until SIGTERM (30 s
    # at most: nothing outlives a failed test for long)
    "accelerate": (
        "#!/bin/bash\ntrap 'echo got-TERM >> \"$FAKE_LOG\"; exit 0' TERM\n"
        '{ printf accelerate; printf \' %q\' "$@"; echo; } >> "$FAKE_LOG"\n'
        '[ -n "${FAKE_EXIT:-}" ] && exit "$FAKE_EXIT"\nfor i in $(seq 300); do sleep 0.1; done\n'
    ),
}


def slurm_env(tmp_path: Path, hosts: str = "node1", **extra: str) -> dict[str, str]:
    """An allocation of ``hosts`` (4 GPUs each, job 4242) with the fakes first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        ACCELERATE=str(bin_dir / "accelerate"),
        FAKE_LOG=str(tmp_path / "log"),
        FAKE_HOSTS=hosts,
        SLURM_JOB_NODELIST="fake[1-9]",
        SLURM_NNODES=str(len(hosts.split())),
        SLURM_JOB_ID="4242",
        SLURM_GPUS_ON_NODE="4",
        SLURM_SUBMIT_DIR=str(ROOT),
        **extra,
    )


def calls(tmp_path: Path) -> list[list[str]]:
    """Each recorded command as its argument list (the srun task string kept whole)."""
    return [shlex.split(line) for line in (tmp_path / "log").read_text().splitlines()]


def sbatch_options(path: Path) -> dict[str, str]:
    """The #SBATCH options as sbatch reads them: the comment block before the first
    command; ``--flag`` without a value maps to ''."""
    options = {}
    for line in path.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            key, _, value = line.split(None, 1)[1].partition("=")
            options[key.removeprefix("--")] = value
        elif line.strip() and not line.startswith("#"):
            break
    return options


def launch(nodes: int, gpus: int, rank: int, head: str) -> list[str]:
    """What ``accelerate`` should get on node ``rank``, up to the training arguments."""
    return (
        f"launch --config_file launch/multinode.yaml --num_machines {nodes} "
        f"--num_processes {nodes * gpus} --machine_rank {rank} --main_process_ip {head} "
        "--main_process_port 24242 pretrain.py"  # 20000 + job id 4242
    ).split()


def test_dry_run_two_nodes_prints_each_nodes_launch_and_runs_nothing(tmp_path):
    env = slurm_env(tmp_path, hosts="gpu-a01 gpu-a02", DRY_RUN="1", FAKE_EXIT="0")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--config", "configs/x.yaml", "train.output_dir=runs/a b"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "log").exists()  # neither srun nor accelerate nor a requeue ran
    nodes = [
        line.split(": ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("node ")
    ]
    training = ["--config", "configs/x.yaml", "train.output_dir=runs/a b"]
    assert [shlex.split(line) for line in nodes] == [
        ["exec", env["ACCELERATE"], *launch(2, 4, rank, "gpu-a01"), *training] for rank in (0, 1)
    ]


@pytest.fixture
def run_job(tmp_path):
    """Start the batch script in its own process group; the group is killed at the end,
    so a test that fails mid-job leaves no fake srun or launcher behind."""
    started = []

    def start(*args: str, **extra: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["bash", str(SCRIPT), *args],
            cwd=ROOT,
            env=slurm_env(tmp_path, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("code", [0, 3])
def test_a_run_launches_once_per_node_and_keeps_the_exit_status(tmp_path, run_job, code):
    """Catches: a requeue after a run that ended by itself, a failed run reported as
    success, srun without --kill-on-bad-exit (one dead node would leave the rest waiting),
    the node rank fixed on the batch host instead of read on each node."""
    proc = run_job("train.max_steps=5", FAKE_EXIT=str(code))
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    srun, accelerate = calls(tmp_path)
    assert srun[:5] == ["srun", "--nodes=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash"]
    assert "--machine_rank $SLURM_NODEID" in srun[-1]
    assert accelerate == ["accelerate", *launch(1, 4, 0, "node1"), "train.max_steps=5"]


def test_the_signal_sbatch_sends_checkpoints_and_requeues(tmp_path, run_job):
    """The preemption path: the signal the #SBATCH header asks SLURM to send the batch
    shell (``--signal=B:SIG@secs``) reaches the launcher as SIGTERM, and the job is
    requeued (which SLURM allows only for a job submitted with ``--requeue``). Catches: a
    trap on another signal than the header's, the signal not passed on, no requeue."""
    options = sbatch_options(SCRIPT)
    assert "requeue" in options and options["signal"].startswith("B:")
    sig = getattr(signal, "SIG" + options["signal"][2:].split("@")[0])
    proc = run_job("train.max_steps=5")
    log, deadline = tmp_path / "log", time.time() + 20
    while not (log.is_file() and "accelerate" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 0  # not killed by the signal (-N: killed by signal N)
    assert [c[0] for c in calls(tmp_path)] == ["srun", "accelerate", "got-TERM", "scontrol"]
    assert calls(tmp_path)[-1] == ["scontrol", "requeue", "4242"]


def dry_run_without_scontrol(tmp_path: Path, nodelist: str) -> subprocess.CompletedProcess:
    """The dry run off the cluster: the fakes minus scontrol, and a PATH with no other."""
    env = slurm_env(tmp_path, DRY_RUN="1") | {"SLURM_JOB_NODELIST": nodelist}
    (tmp_path / "bin" / "scontrol").unlink()
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    del env["SLURM_NNODES"]  # the node count then follows the list
    if shutil.which("scontrol", path=env["PATH"]):
        pytest.skip("a real scontrol is on the system PATH")
    return subprocess.run(
        ["bash", str(SCRIPT), "train.max_steps=5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[01-03,07],login-b", ["gpu01", "gpu02", "gpu03", "gpu07", "login-b"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("x[1-2]-ib,solo", ["x1-ib", "x2-ib", "solo"]),
        ("solo", ["solo"]),
    ],
)
def test_dry_run_without_scontrol_expands_simple_node_lists(tmp_path, nodelist, hosts):
    """Catches: the dry run failing off the cluster (exit 127, scontrol not found), zero
    padding lost, a range's end or a suffix dropped, the node count not the list's."""
    proc = dry_run_without_scontrol(tmp_path, nodelist)
    assert proc.returncode == 0, proc.stderr
    nodes = [line for line in proc.stdout.splitlines() if line.startswith("node ")]
    assert [line.split("(", 1)[1].split(")", 1)[0] for line in nodes] == hosts
    assert nodes[-1].split(": ", 1)[1].split() == [
        "exec",
        str(tmp_path / "bin" / "accelerate"),
        *launch(len(hosts), 4, len(hosts) - 1, hosts[0]),
        "train.max_steps=5",
    ]


def test_dry_run_without_scontrol_names_what_it_needs_for_other_lists(tmp_path):
    proc = dry_run_without_scontrol(tmp_path, "rack[1-2]-n[01-02]")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert "rack[1-2]-n[01-02]" in line and "scontrol" in line and "host[01-03,07]" in line
