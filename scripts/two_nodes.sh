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
WORK=${1:-$(mktemp -d -t tlm-two-nodes-XXXX)}
PY=${TLM_PYTHON:-python3}
NS=(tlm-node0 tlm-node1)
ADDR=(10.231.0.1 10.231.0.2)
export TLM_PYTHON=$PY HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1

cleanup() { for ns in "${NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done; }
trap cleanup EXIT
cleanup
ip netns add "${NS[0]}"; ip netns add "${NS[1]}"
ip link add tlm-veth0 type veth peer name tlm-veth1
for i in 0 1; do
    ip link set "tlm-veth$i" netns "${NS[$i]}"
    ip netns exec "${NS[$i]}" ip addr add "${ADDR[$i]}/24" dev "tlm-veth$i"
    ip netns exec "${NS[$i]}" ip link set "tlm-veth$i" up
    ip netns exec "${NS[$i]}" ip link set lo up
done
echo "node0 ${ADDR[0]} (namespace ${NS[0]}), node1 ${ADDR[1]} (namespace ${NS[1]}), joined by a veth pair"

cd "$REPO"
# Data prepared once, read by every run (the runs must not race to prepare it).
TEXT=data_pipeline/corpora/tinyshakespeare.txt.xz
"$PY" -m tlm tokenizer --data "$TEXT" --sample_by paragraph --out "$WORK/tok" --vocab_size 512 >/dev/null
"$PY" -m tlm prepare --data "$TEXT" --sample_by paragraph --tokenizer "$WORK/tok" --out "$WORK/data" --seq_len 64 \
    --val 0.05 >/dev/null
COMMON=(--config configs/debug.yaml --data.prepared="$WORK/data" --train.backend=deepspeed --train.zero_stage=2
        --train.max_steps=6 --eval.every=3 --eval.max_batches=2 --logging.sample_prompt=None --train.precision=fp32
        --model.vocab_size=512)

echo "== one node, two processes (the reference)"
PROCS_PER_NODE=2 OMP_NUM_THREADS=1 launch/torchrun.sh "${COMMON[@]}" --logging.run_dir="$WORK/one-node" \
    >"$WORK/one-node.log" 2>&1

echo "== torchrun across the two namespaces"
for i in 1 0; do
    # node 0 hosts the rendezvous store: its hostname does not resolve to its namespace's address, so say so
    ip netns exec "${NS[$i]}" env NNODES=2 MASTER_ADDR="${ADDR[0]}" MASTER_PORT=29511 RDZV_ID=tlm-two-nodes \
        RDZV_CONF="$([ "$i" = 0 ] && echo is_host=1)" LOCAL_ADDR="${ADDR[$i]}" \
        PROCS_PER_NODE=1 OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME="tlm-veth$i" \
        timeout 300 launch/torchrun.sh "${COMMON[@]}" --logging.run_dir="$WORK/torchrun" >"$WORK/torchrun-node$i.log" 2>&1 &
done
wait

echo "== the deepspeed launcher, no-ssh mode, a hostfile naming both nodes"
for i in 1 0; do
    ip netns exec "${NS[$i]}" env NODES="${ADDR[*]}" NO_SSH=1 NODE_RANK=$i MASTER_PORT=29512 HOSTFILE="$WORK/hostfile$i" \
        PROCS_PER_NODE=1 OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME="tlm-veth$i" \
        timeout 300 launch/deepspeed.sh "${COMMON[@]}" --logging.run_dir="$WORK/deepspeed" >"$WORK/deepspeed-node$i.log" 2>&1 &
done
wait

"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
def losses(run):
    records = [json.loads(l) for l in (work / run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r]
reference = losses("one-node")
result = {"one-node": reference}
for run in ("torchrun", "deepspeed"):
    result[run] = losses(run)
    same = all(abs(a - b) <= 1e-5 for a, b in zip(result[run][0] + result[run][1], reference[0] + reference[1]))
    result[run + "-equal"] = same and len(result[run][0]) == len(reference[0])
print(f"{'run':18s} {'train losses':60s} val losses")
for run in ("one-node", "torchrun", "deepspeed"):
    print(f"{run:18s} {' '.join(f'{x:.5f}' for x in result[run][0]):60s} {' '.join(f'{x:.5f}' for x in result[run][1])}")
print("equal to one node within 1e-5:", {r: result[r + "-equal"] for r in ("torchrun", "deepspeed")})
(work / "result.json").write_text(json.dumps(result, indent=1))
sys.exit(0 if all(result[r + "-equal"] for r in ("torchrun", "deepspeed")) else 1)
EOF
