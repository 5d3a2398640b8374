#!/usr/bin/env bash
# Two "nodes" on one Linux machine: two network namespaces joined by a veth pair, each with its own address and
# no other network. Proves tlm's multi-node launch paths across them, each training the debug preset with
# DeepSpeed ZeRO-2 (one process per node, world size 2) to the same losses as one node running both processes:
#   1. torchrun, c10d rendezvous on node 0's address (launch/torchrun.sh with NNODES=2)
#   2. the deepspeed launcher in its no-ssh mode, a hostfile naming both addresses (launch/deepspeed.sh with
#      NODES=... NO_SSH=1 NODE_RANK=i), started on every node
# Both nodes see the same files (as nodes on a shared filesystem): the data and the run folder. Needs root (ip
# netns). Prints a table and writes WORK/result.json; cleans the namespaces up on exit.
#
#   sudo scripts/two_nodes.sh [WORK_DIR]      (python3 with tlm installed; TLM_PYTHON=... to choose)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/scripts/netns_nodes.sh"
two_nodes_start two_nodes "${1:-}" ""
trap nodes_down EXIT
nodes_up
cd "$REPO"
prepare_data
reference_run

echo "== torchrun across the two namespaces"
for i in 1 0; do
    # node 0 hosts the rendezvous store: its hostname does not resolve to its namespace's address, so say so
    ip netns exec "${NS[$i]}" env NNODES=2 MASTER_ADDR="${ADDR[0]}" MASTER_PORT=29511 RDZV_ID=tlm-two-nodes \
        RDZV_CONF="$([ "$i" = 0 ] && echo is_host=1)" LOCAL_ADDR="${ADDR[$i]}" PROCS_PER_NODE=1 "${NODE_ENV[@]}" \
        timeout 300 launch/torchrun.sh "${COMMON[@]}" --logging.run_dir="$WORK/torchrun" >"$WORK/torchrun-node$i.log" 2>&1 &
done
wait

echo "== the deepspeed launcher, no-ssh mode, a hostfile naming both nodes"
for i in 1 0; do
    ip netns exec "${NS[$i]}" env NODES="${ADDR[*]}" NO_SSH=1 NODE_RANK=$i MASTER_PORT=29512 HOSTFILE="$WORK/hostfile$i" \
        PROCS_PER_NODE=1 "${NODE_ENV[@]}" \
        timeout 300 launch/deepspeed.sh "${COMMON[@]}" --logging.run_dir="$WORK/deepspeed" >"$WORK/deepspeed-node$i.log" 2>&1 &
done
wait

compare_losses torchrun deepspeed
