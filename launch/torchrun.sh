#!/usr/bin/env bash
# Start `tlm train` with torchrun on one node or many (c10d rendezvous).
#
#   launch/torchrun.sh --config configs/tlm-26m.yaml                       # this node, all its GPUs
#   PROCS_PER_NODE=2 launch/torchrun.sh --config configs/debug.yaml        # 2 processes (CPU: gloo ranks)
#   NNODES=4 MASTER_ADDR=gpu1 MASTER_PORT=29500 launch/torchrun.sh ...      # the same command on each node
#   (RDZV_CONF=is_host=1 on the first node when MASTER_ADDR is an address its hostname does not resolve to, and
#    LOCAL_ADDR=<this node's address> on every node whose hostname resolves to an address the others cannot reach)
#
# With NNODES > 1 every node runs this with the same MASTER_ADDR:MASTER_PORT (the rendezvous endpoint, on
# the first node) and RDZV_ID; node ranks are assigned at rendezvous.
set -euo pipefail
source "$(dirname "$0")/common.sh"
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
    rdzv=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_id "${RDZV_ID:-tlm}"
          --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR to the first node}:${MASTER_PORT:-29500}")
    # The first node hosts the rendezvous store when it recognises MASTER_ADDR as its own name or address; where
    # it cannot (an address its hostname does not resolve to), RDZV_CONF=is_host=1 on that node says so.
    if [ -n "${RDZV_CONF:-}" ]; then rdzv+=(--rdzv_conf "$RDZV_CONF"); fi
    # The address this node gives the others (default: its hostname's); set it where that is not reachable.
    if [ -n "${LOCAL_ADDR:-}" ]; then rdzv+=(--local_addr "$LOCAL_ADDR"); fi
    # A node that replaces a lost one joins a later rendezvous round; with torch's shared TCPStore (its default)
    # it waits for an address the first round's rank 0 never publishes again, so each round builds its own.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
else
    rdzv=(--standalone --nnodes 1)
fi
# tlm.training.launch torchrun: torchrun itself, ending quietly (status 130) on Ctrl-C once the ranks have checkpointed.
# Other torchrun flags: TORCHRUN_ARGS, e.g. "--max-restarts 3" (elastic restarts after a rank or a node fails).
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of flags
exec "$TLM_PYTHON" -m tlm.training.launch torchrun "${rdzv[@]}" ${TORCHRUN_ARGS:-} --nproc_per_node "$PROCS" -m tlm train "$@"
