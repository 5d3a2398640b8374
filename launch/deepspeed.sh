#!/usr/bin/env bash
# Start `tlm train` with the deepspeed launcher on one node or many.
#
#   launch/deepspeed.sh --config configs/tlm-26m.yaml                     # this node, all its GPUs
#   PROCS_PER_NODE=2 launch/deepspeed.sh --config configs/debug.yaml      # 2 processes (CPU: gloo ranks)
#   NODES="gpu1 gpu2" launch/deepspeed.sh --config ...                    # from one node, over ssh (pdsh)
#   NODES="gpu1 gpu2" NODE_RANK=$i NO_SSH=1 launch/deepspeed.sh --config ...   # no ssh: run on every node
#
# NODES becomes a hostfile ("host slots=PROCS_PER_NODE" per line, in $HOSTFILE, default ./hostfile); the
# first node is the master; MASTER_PORT defaults to a free port (give the same one on every node in no-ssh
# mode). The --local_rank the launcher appends is read by tlm. Other deepspeed flags: DS_ARGS.
set -euo pipefail
source "$(dirname "$0")/common.sh"
args=(--master_port "${MASTER_PORT:-$(tlm_free_port)}")
if [ -n "${NODES:-}" ]; then
    HOSTFILE=${HOSTFILE:-$PWD/hostfile}
    : >"$HOSTFILE"
    for node in $NODES; do echo "$node slots=$PROCS" >>"$HOSTFILE"; done
    MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | cut -d' ' -f1)}
    args+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR")
    if [ -n "${NO_SSH:-}" ]; then
        args+=(--no_ssh --node_rank "${NODE_RANK:?NO_SSH needs NODE_RANK}")
    elif [ "$(wc -l <"$HOSTFILE")" = 1 ] && { [ "$MASTER_ADDR" = localhost ] || [ "$MASTER_ADDR" = "$(hostname)" ] ||
            [ "$MASTER_ADDR" = "$(hostname -s)" ]; }; then
        args+=(--no_ssh_check)  # one local node: deepspeed runs it locally, no ssh needed
    fi
else
    args+=(--num_gpus "$PROCS")
fi
# shellcheck disable=SC2086  # DS_ARGS is a list of flags
# tlm.training.launch deepspeed: the deepspeed runner itself, ending quietly (status 130) on Ctrl-C once the ranks have
# checkpointed.
exec "$TLM_PYTHON" -m tlm.training.launch deepspeed "${args[@]}" ${DS_ARGS:-} --module tlm train "$@"
