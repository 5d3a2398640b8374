# Sourced by scripts/two_nodes*.sh: two "nodes" on one Linux machine (network namespaces joined by a veth pair,
# the interface named tlm0 in both so that GLOO_SOCKET_IFNAME=tlm0 holds everywhere), the data both train on, the
# one-node reference run, and the comparison of losses. Expects REPO to be set; defines NS, ADDR and NODE_ENV;
# two_nodes_start sets WORK and PY.

# two_nodes_start NAME WORK_DIR HINT TOOL...: refuse in one line, before anything is made, to run other than as
# root or without one of the tools (python and ip included; HINT says how to install them); then WORK (WORK_DIR
# made absolute, or a new temporary folder) and PY (TLM_PYTHON, default python3, exported for the launch scripts).
two_nodes_start() {
    local name=$1 work=$2 hint=$3 tool
    shift 3
    [ "$(id -u)" = 0 ] || { echo "$name: needs root (ip netns); rerun with sudo"; exit 2; }
    PY=${TLM_PYTHON:-python3}
    export TLM_PYTHON=$PY
    for tool in ip "$PY" "$@"; do
        command -v "$tool" >/dev/null || { echo "$name: $tool is missing${hint:+ ($hint)}"; exit 2; }
    done
    WORK=${work:-$(mktemp -d -t "tlm-$name-XXXX")}
    mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
}

NS=(tlm-node0 tlm-node1)
ADDR=(10.231.0.1 10.231.0.2)
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
NODE_ENV=(GLOO_SOCKET_IFNAME=tlm0 OMP_NUM_THREADS=1)  # for a rank inside a namespace (the host has no tlm0)

nodes_down() { for ns in "${NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done; }

nodes_up() {
    nodes_down
    ip netns add "${NS[0]}"; ip netns add "${NS[1]}"
    ip link add tlm-veth0 type veth peer name tlm-veth1
    for i in 0 1; do
        ip link set "tlm-veth$i" netns "${NS[$i]}"
        ip netns exec "${NS[$i]}" ip link set "tlm-veth$i" name tlm0
        ip netns exec "${NS[$i]}" ip addr add "${ADDR[$i]}/24" dev tlm0
        ip netns exec "${NS[$i]}" ip link set tlm0 up
        ip netns exec "${NS[$i]}" ip link set lo up
    done
    echo "node0 ${ADDR[0]} (namespace ${NS[0]}), node1 ${ADDR[1]} (namespace ${NS[1]}), joined by a veth pair"
}

# The data, prepared once before any run (the runs must not race to prepare it), and the arguments every run shares:
# the debug preset, DeepSpeed ZeRO-2, fp32, 6 steps.
prepare_data() {
    local text=data_pipeline/corpora/tinyshakespeare.txt.xz
    "$PY" -m tlm tokenizer --data "$text" --sample_by paragraph --out "$WORK/tok" --vocab_size 512 >/dev/null
    "$PY" -m tlm prepare --data "$text" --sample_by paragraph --tokenizer "$WORK/tok" --out "$WORK/data" --seq_len 64 \
        --val 0.05 >/dev/null
    COMMON=(--config configs/debug.yaml --data.prepared="$WORK/data" --train.backend=deepspeed --train.zero_stage=2
            --train.max_steps=6 --eval.every=3 --eval.max_batches=2 --logging.sample_prompt=None --train.precision=fp32
            --model.vocab_size=512)
}

reference_run() {
    echo "== one node, two processes (the reference)"
    PROCS_PER_NODE=2 OMP_NUM_THREADS=1 TLM_PYTHON=$PY launch/torchrun.sh "${COMMON[@]}" \
        --logging.run_dir="$WORK/one-node" >"$WORK/one-node.log" 2>&1
}

# compare_losses RUN...: each run folder's losses against one-node's; a table, WORK/result.json, and the exit status.
compare_losses() {
    "$PY" - "$WORK" "$@" <<'PY'
import json, sys
from pathlib import Path
work, runs = Path(sys.argv[1]), sys.argv[2:]
def losses(run):
    records = [json.loads(l) for l in (work / run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r]
reference = losses("one-node")
result = {"one-node": reference}
for run in runs:
    result[run] = losses(run)
    same = all(abs(a - b) <= 1e-5 for a, b in zip(result[run][0] + result[run][1], reference[0] + reference[1]))
    result[run + "-equal"] = same and len(result[run][0]) == len(reference[0])
print(f"{'run':18s} {'train losses':60s} val losses")
for run in ["one-node", *runs]:
    print(f"{run:18s} {' '.join(f'{x:.5f}' for x in result[run][0]):60s} {' '.join(f'{x:.5f}' for x in result[run][1])}")
print("equal to one node within 1e-5:", {r: result[r + "-equal"] for r in runs})
(work / "result.json").write_text(json.dumps(result, indent=1))
sys.exit(0 if all(result[r + "-equal"] for r in runs) else 1)
PY
}
