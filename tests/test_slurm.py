"""slurm/dim.sh in dry-run mode, with a fake `scontrol` on PATH: the per-node commands."""
from __future__ import annotations

import os
import subprocess

from train_helpers import ROOT


def test_dry_run_two_nodes(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
                    'echo "gpu-a01"\necho "gpu-a02"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", DRY_RUN="1",
               SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NNODES="2", SLURM_JOB_ID="4242",
               SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(ROOT))
    proc = subprocess.run(["bash", "slurm/dim.sh", "--config", "configs/x.yaml",
                           "train.output_dir=runs/a b"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
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
        for part in ("launch --config_file launch/multinode.yaml", "--num_machines 2",
                     "--num_processes 8", "--main_process_ip gpu-a01",
                     "--main_process_port 24242", "pretrain.py --config configs/x.yaml",
                     "train.output_dir=runs/a\\ b"):
            assert part in line, (part, line)


def test_script_requeues_on_signal():
    text = (ROOT / "slurm" / "dim.sh").read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "trap on_signal USR1 TERM",
                 "scontrol requeue"):
        assert line in text
