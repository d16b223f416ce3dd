"""slurm/dim.sh in dry-run mode, with a fake `scontrol` on PATH: the per-node commands."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from train_helpers import ROOT


def test_dry_run_two_nodes(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text(
        '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\necho "gpu-a01"\necho "gpu-a02"\n'
    )
    fake.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{tmp_path}:{os.environ['PATH']}",
        DRY_RUN="1",
        SLURM_JOB_NODELIST="gpu-a[01-02]",
        SLURM_NNODES="2",
        SLURM_JOB_ID="4242",
        SLURM_GPUS_ON_NODE="4",
        SLURM_SUBMIT_DIR=str(ROOT),
    )
    proc = subprocess.run(
        ["bash", "slurm/dim.sh", "--config", "configs/x.yaml", "train.output_dir=runs/a b"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    srun = next(line for line in lines if line.startswith("srun:"))
    # the node rank stays a variable in the srun string, for each node to expand itself
    assert "--machine_rank\\ \\$SLURM_NODEID" in srun and "--nodes=2" in srun
    assert "--ntasks-per-node=1" in srun
    nodes = [line for line in lines if line.startswith("node ")]
    assert len(nodes) == 2
    for rank, line in enumerate(nodes):
        assert f"--machine_rank {rank} " in line
        for part in (
            "launch --config_file launch/multinode.yaml",
            "--num_machines 2",
            "--num_processes 8",
            "--main_process_ip gpu-a01",
            "--main_process_port 24242",
            "pretrain.py --config configs/x.yaml",
            "train.output_dir=runs/a\\ b",
        ):
            assert part in line, (part, line)


def test_script_requeues_on_signal():
    text = (ROOT / "slurm" / "dim.sh").read_text()
    for line in (
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "trap on_signal USR1 TERM",
        "scontrol requeue",
    ):
        assert line in text


def test_usr1_forwards_sigterm_and_requeues(tmp_path):
    """The preemption path with fake srun/scontrol/accelerate: USR1 to the batch script
    reaches the launcher as SIGTERM, and the job asks to be requeued."""
    log = tmp_path / "log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "scontrol": (
            f'#!/bin/bash\nif [ "$1" = show ]; then echo node1; else echo "$*" >> {log}; fi\n'
        ),
        # srun: run the task's `bash -c` string as node 0 and pass SIGTERM on, like srun does
        "srun": (
            '#!/bin/bash\nfor a in "$@"; do last="$a"; done\n'
            'SLURM_NODEID=0 bash -c "$last" & child=$!\n'
            "trap 'kill -TERM $child' TERM\nwait $child; wait $child\n"
        ),
        "accelerate": (
            f"#!/bin/bash\ntrap 'echo got-TERM >> {log}; exit 0' TERM\n"
            f'echo "launch $*" >> {log}\nwhile true; do sleep 0.1; done\n'
        ),
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        ACCELERATE=str(bin_dir / "accelerate"),
        SLURM_JOB_NODELIST="node1",
        SLURM_NNODES="1",
        SLURM_JOB_ID="4242",
        SLURM_GPUS_ON_NODE="2",
        SLURM_SUBMIT_DIR=str(ROOT),
    )
    proc = subprocess.Popen(
        ["bash", "slurm/dim.sh", "train.max_steps=5"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 20
    while not (log.is_file() and "launch" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    lines = log.read_text().splitlines()
    assert "--machine_rank 0" in lines[0] and "train.max_steps=5" in lines[0]
    assert "got-TERM" in lines and "requeue 4242" in lines
