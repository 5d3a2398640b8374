#!/usr/bin/env bash
# sbatch with the cluster settings as variables with defaults:
#   PARTITION=gpu ACCOUNT=proj TIME=12:00:00 NODES=1 GPUS_PER_NODE=8 TLM_CONFIG=configs/tlm-26m.yaml \
#       slurm/submit.sh slurm/pretrain.sbatch [extra sbatch flags]
# GPUS_PER_NODE=0 is CPU mode: CPU_TASKS_PER_NODE ranks per node (default 2), gloo.
set -euo pipefail
script=${1:?usage: slurm/submit.sh SCRIPT.sbatch [sbatch flags]}
shift
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
CPUS_PER_TASK=${CPUS_PER_TASK:-8}
TIME=${TIME:-04:00:00}
flags=(--nodes="$NODES" --time="$TIME" --cpus-per-task="$CPUS_PER_TASK")
[ -n "${PARTITION:-}" ] && flags+=(--partition="$PARTITION")
[ -n "${ACCOUNT:-}" ] && flags+=(--account="$ACCOUNT")
if [ "$GPUS_PER_NODE" -gt 0 ]; then
    flags+=(--gpus-per-node="$GPUS_PER_NODE")
    tasks=$GPUS_PER_NODE
else
    tasks=${CPU_TASKS_PER_NODE:-2}
fi
if [ "${TLM_LAUNCHER:-srun}" = torchrun ]; then
    export TLM_PROCS_PER_NODE=$tasks
    tasks=1
fi
flags+=(--ntasks-per-node="$tasks")
export TLM_CONFIG=${TLM_CONFIG:-configs/tlm-26m.yaml}
exec sbatch "${flags[@]}" "$@" "$script"
