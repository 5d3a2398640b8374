# Sourced by the sbatch scripts: environment for tlm ranks, and preemption with requeue.
#
# Variables (set them in the environment before sbatch, or edit the defaults here):
#   TLM_HOME     the tlm checkout holding slurm/      (default: the submit directory)
#   TLM_CONFIG   the recipe                           (default: \$TLM_HOME/configs/tlm-26m.yaml)
#   TLM_ARGS     extra `tlm train` overrides          (default: none), e.g. "--train.max_steps=1000"
#   TLM_PYTHON   the interpreter with tlm installed   (default: python3 on PATH, i.e. the submitting venv)
#   MASTER_PORT  rendezvous port                      (default: derived from the job id)
#   TLM_MAX_REQUEUES  requeues after a rank lost its peers (exit 75: a node failed)  (default: 3)
# CPU mode: on nodes without GPUs the ranks use gloo, one thread per core of the task.

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"  # runs/ and the job's files go here
TLM_HOME=${TLM_HOME:-$PWD}
TLM_CONFIG=${TLM_CONFIG:-$TLM_HOME/configs/tlm-26m.yaml}
TLM_ARGS=${TLM_ARGS:-}
TLM_PYTHON=${TLM_PYTHON:-python3}

# Ranks come from srun (SLURM_PROCID, ...) or torchrun, never from the submitting shell's environment.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export TOKENIZERS_PARALLELISM=false
# A file the trainer checks after every step: the portable way to ask every rank, on every node and
# under any launcher, to checkpoint and stop.
export TLM_STOP_FILE=${TLM_STOP_FILE:-$PWD/.tlm-stop-${SLURM_JOB_ID}}
rm -f "$TLM_STOP_FILE"
# A rank that lost its peers (exit 75) also touches this file: srun reports the highest status of its tasks, and
# the other tasks' is usually a kill's.
export TLM_LOST_PEER_FILE=$PWD/.tlm-lost-peer-${SLURM_JOB_ID}
rm -f "$TLM_LOST_PEER_FILE"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TLM_DEVICE=cuda
else
    TLM_DEVICE=cpu  # gloo; NCCL settings do not apply
fi
echo "tlm: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}, ${SLURM_NTASKS:-1} tasks," \
     "${TLM_DEVICE}, master ${MASTER_ADDR}:${MASTER_PORT}" >&2

TLM_PREEMPTED=""
tlm_on_signal() {
    TLM_PREEMPTED=$1
    echo "tlm: ${1} received: the trainer checkpoints after its current step and stops; the job then requeues" >&2
    touch "$TLM_STOP_FILE"
    [ -n "${TLM_TRAINER_PID:-}" ] && kill -USR1 "$TLM_TRAINER_PID" 2>/dev/null || true
}
trap 'tlm_on_signal USR1' USR1
trap 'tlm_on_signal TERM' TERM

# Run the trainer in the background (a trap only runs between foreground commands), wait for it to
# really end, then requeue the job if it was preempted: the rerun resumes from the newest checkpoint.
tlm_run() {
    "$@" &
    TLM_TRAINER_PID=$!
    local status=0
    while true; do
        wait "$TLM_TRAINER_PID" && status=0 || status=$?
        kill -0 "$TLM_TRAINER_PID" 2>/dev/null || break  # still running: wait was cut short by a signal
    done
    rm -f "$TLM_STOP_FILE"
    local lost=""
    if [ "$status" = 75 ] || [ -f "$TLM_LOST_PEER_FILE" ]; then lost=1; fi
    rm -f "$TLM_LOST_PEER_FILE"
    if [ -n "$TLM_PREEMPTED" ]; then
        echo "tlm: requeueing job ${SLURM_JOB_ID} (trainer exited with ${status})" >&2
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    # 75: a rank lost its peers (a node failed or went silent): requeue, the rerun resumes from the last checkpoint,
    # at most TLM_MAX_REQUEUES times (default 3) so that a node that always fails does not loop for ever
    if [ -n "$lost" ] && [ "${SLURM_RESTART_COUNT:-0}" -lt "${TLM_MAX_REQUEUES:-3}" ]; then
        echo "tlm: a rank lost its peers (exit 75): requeueing job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0} of at most ${TLM_MAX_REQUEUES:-3})" >&2
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    return "$status"
}
