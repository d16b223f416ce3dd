#!/usr/bin/env bash
# Deep InfoMax pretraining on N nodes x G GPUs under SLURM.
#
#   sbatch --nodes 4 --gpus-per-node 8 slurm/dim.sh --config configs/X.yaml train.batch_size=256
#
# One srun task per node runs `accelerate launch`, which starts G processes there; every
# node reads its own rank from its own SLURM_NODEID (escaped below, so it is expanded on
# the node, not here). Rendezvous at the first host of the allocation.
#
# Preemption: SLURM sends USR1 to this script 120 s before the time limit (--signal) or
# on preemption; the trap forwards SIGTERM to srun, which passes it to every task; the
# training processes save a checkpoint at the next step boundary and exit, and the job
# is requeued (--requeue). The rerun resumes from train.output_dir's latest checkpoint.
#
# Environment: LAUNCH_CONFIG (launch/multinode.yaml; launch/deepspeed_zero2.yaml for
# ZeRO-2), GPUS_PER_NODE (from SLURM), MASTER_PORT (derived from the job id),
# ACCELERATE (the accelerate command), DRY_RUN=1 prints the commands and runs nothing
# (also off the cluster: without scontrol, simple SLURM_JOB_NODELIST forms such as
# gpu[01-03,07] are expanded by the script itself).
#
#SBATCH --job-name=dim-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}"

GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}}
GPUS=${GPUS##*:}                      # "a100:8" -> "8"

# The allocation's host names, one a line: scontrol's answer, or without scontrol (a dry
# run off the cluster) the simple forms expanded here: host, prefix[01-03,07]suffix, and
# comma-separated lists of them. Anything else is one line on stderr and status 2.
hostnames() {
    if command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$1"
        return
    fi
    local rest=$1 range lo hi i
    local bracketed='^([^],[]*)\[([0-9,-]+)\]([^],[]*)(,|$)' plain='^([^],[]+)(,|$)'
    while [ -n "$rest" ]; do
        if [[ $rest =~ $bracketed ]]; then
            for range in ${BASH_REMATCH[2]//,/ }; do
                lo=${range%-*} hi=${range#*-}
                for ((i = 10#$lo; i <= 10#$hi; i++)); do   # zero-padded to lo's width
                    printf '%s%0*d%s\n' "${BASH_REMATCH[1]}" "${#lo}" "$i" "${BASH_REMATCH[3]}"
                done
            done
        elif [[ ! $rest =~ $plain ]]; then
            echo "slurm/dim.sh: cannot expand SLURM_JOB_NODELIST=$1 without scontrol" \
                "(known forms: host, host[01-03,07], comma-separated lists of them);" \
                "put scontrol on PATH or list the hosts plainly" >&2
            return 2
        else
            echo "${BASH_REMATCH[1]}"
        fi
        rest=${rest:${#BASH_REMATCH[0]}}
    done
}
HOSTS=$(hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM allocation}") || exit 2
NODES=($HOSTS)
NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-${#NODES[@]}}}
HEAD=${NODES[0]}
PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
LAUNCH_CONFIG=${LAUNCH_CONFIG:-launch/multinode.yaml}
if [ -z "${ACCELERATE:-}" ]; then
    if [ -x .venv/bin/accelerate ]; then ACCELERATE=.venv/bin/accelerate; else ACCELERATE=accelerate; fi
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a dead rank fails the job instead of hanging it
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
[ -n "${NCCL_SOCKET_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME
[ -n "${NCCL_IB_DISABLE:-}" ] && export NCCL_IB_DISABLE

ARGS=""
for a in "$@"; do ARGS+=" $(printf '%q' "$a")"; done

# \$SLURM_NODEID stays literal here and is expanded by each node's own bash.
LAUNCH="exec $ACCELERATE launch --config_file $LAUNCH_CONFIG \
--num_machines $NNODES --num_processes $((NNODES * GPUS)) --machine_rank \$SLURM_NODEID \
--main_process_ip $HEAD --main_process_port $PORT pretrain.py$ARGS"
SRUN=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$LAUNCH")

if [ "${DRY_RUN:-0}" = "1" ]; then
    echo "head: $HEAD:$PORT  nodes: $NNODES  gpus/node: $GPUS  world: $((NNODES * GPUS))"
    printf 'srun:'; printf ' %q' "${SRUN[@]}"; echo
    for i in "${!NODES[@]}"; do
        echo "node $i (${NODES[$i]}): $(SLURM_NODEID=$i bash -c "echo \"$LAUNCH\"")"
    done
    exit 0
fi

PREEMPTED=0
on_signal() {
    PREEMPTED=1
    echo "[dim.sh] $(date -Is) signal received: asking the ranks to checkpoint and stop"
    kill -TERM "$SRUN_PID" 2>/dev/null || true
}
trap on_signal USR1 TERM

"${SRUN[@]}" &
SRUN_PID=$!
status=0
wait "$SRUN_PID" || status=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do   # a trapped signal interrupts `wait`
    wait "$SRUN_PID" || status=$?
done

if [ "$PREEMPTED" = "1" ]; then
    echo "[dim.sh] requeueing job ${SLURM_JOB_ID:-?}"
    # (|| true: under a preemption with PreemptMode=REQUEUE, SLURM requeues it itself)
    scontrol requeue "${SLURM_JOB_ID}" || true
    exit 0
fi
exit "$status"
