#!/usr/bin/env bash
# A node lost mid-run, on two "nodes" of one Linux machine (network namespaces, scripts/netns_nodes.sh), under
# torchrun's elastic restarts (--max-restarts): train the debug preset (DDP, one rank per node, 40 steps, a
# checkpoint every 10), and once step 14 is logged
#   trial 1 (kill): kill -9 every process of node 1 (its torchrun agent and its rank), as a power loss would;
#   trial 2 (link): take node 1's link down for LINK_DOWN_S seconds, as a switch failure would.
# The surviving rank notices at once when its peer's connections close (trial 1) and within
# train.collective_timeout_s (COLLECTIVE_TIMEOUT_S here) when they go silent (trial 2); node 0's agent restarts its
# rank and waits at the rendezvous; node 1 comes back (restarted after RESTART_AFTER_S in trial 1, as a scheduler
# would; its agent itself in trial 2), both resume from the last complete checkpoint (step 10) and end with the
# one-node run's losses bit for bit. Prints a table with the times, writes WORK/node-loss.json; needs root.
#
#   sudo scripts/two_nodes_node_loss.sh [WORK_DIR]      (TLM_PYTHON=... for the python with tlm installed)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
COLLECTIVE_TIMEOUT_S=${COLLECTIVE_TIMEOUT_S:-20}
RESTART_AFTER_S=${RESTART_AFTER_S:-5}
LINK_DOWN_S=${LINK_DOWN_S:-30}
source "$REPO/scripts/netns_nodes.sh"
two_nodes_start two_nodes_node_loss "${1:-}" "apt-get install bc" bc
trap nodes_down EXIT
nodes_up
cd "$REPO"
prepare_data
COMMON=(--config configs/debug.yaml --data.prepared="$WORK/data" --model.vocab_size=512 --train.precision=fp32
        --train.max_steps=40 --checkpoint.every=10 --checkpoint.keep_last=3 --eval.every=10 --eval.max_batches=2
        --logging.sample_prompt=None --train.collective_timeout_s="$COLLECTIVE_TIMEOUT_S")
reference_run
now() { date +%s.%N; }

# node I of run RUN (background): torchrun with elastic restarts, the rendezvous on node 0
start_node() {
    local i=$1 run=$2 port=$3
    ip netns exec "${NS[$i]}" env NNODES=2 MASTER_ADDR="${ADDR[0]}" MASTER_PORT="$port" RDZV_ID="tlm-$run" \
        RDZV_CONF="$([ "$i" = 0 ] && echo is_host=1)" LOCAL_ADDR="${ADDR[$i]}" PROCS_PER_NODE=1 "${NODE_ENV[@]}" \
        TORCHRUN_ARGS="--max-restarts 3" timeout 600 launch/torchrun.sh "${COMMON[@]}" --logging.run_dir="$WORK/$run" \
        >>"$WORK/$run-node$i.log" 2>&1 &
}
wait_for_step() {  # until RUN's metrics.jsonl holds a training record of step >= N
    until "$PY" -c 'import json, sys
steps = []
for line in open(sys.argv[1]).read().splitlines():
    try:
        record = json.loads(line)
    except ValueError:
        continue
    if "loss" in record:
        steps.append(record["step"])
sys.exit(0 if steps and max(steps) >= int(sys.argv[2]) else 1)' "$WORK/$1/metrics.jsonl" "$2" 2>/dev/null; do sleep 0.1; done
}
wait_for_line() {  # until FILE holds a line matching PATTERN; prints the time
    until grep -q "$2" "$1" 2>/dev/null; do sleep 0.1; done
    now
}

echo "== trial 1: kill -9 every process of node 1 after step 14"
start_node 0 kill 29521; start_node 1 kill 29521
wait_for_step kill 14
killed=$(now)
ip netns pids "${NS[1]}" | xargs -r kill -9
noticed=$(wait_for_line "$WORK/kill-node0.log" "tlm: rank 0 of 2: error")
sleep "$RESTART_AFTER_S"
restarted=$(now)
start_node 1 kill 29521
wait
echo "== trial 2: node 1's link down for ${LINK_DOWN_S} s after step 14"
start_node 0 link 29522; start_node 1 link 29522
wait_for_step link 14
down=$(now)
ip netns exec "${NS[1]}" ip link set tlm0 down
noticed_link=$(wait_for_line "$WORK/link-node0.log" "tlm: rank 0 of 2: error")
sleep "$(echo "$LINK_DOWN_S - ($noticed_link - $down)" | bc | sed 's/^-.*/0/')"
ip netns exec "${NS[1]}" ip link set tlm0 up
up=$(now)
wait

"$PY" - "$WORK" "$killed" "$noticed" "$restarted" "$down" "$noticed_link" "$up" "$COLLECTIVE_TIMEOUT_S" <<'PY'
import json, sys
from pathlib import Path
from tlm.training.metrics import line_of_descent, read_metrics
work = Path(sys.argv[1])
killed, noticed, restarted, down, noticed_link, up, timeout = map(float, sys.argv[2:9])
def run(name):
    records = line_of_descent(read_metrics(work / name / "metrics.jsonl"))
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    sessions = [json.loads(l) for l in (work / name / "metrics.jsonl").read_text().splitlines() if '"session"' in l]
    summary = json.loads((work / name / "summary.json").read_text()) if (work / name / "summary.json").is_file() else {}
    torn = sorted(p.name for p in (work / name / "checkpoints").iterdir() if p.name.startswith((".", "tmp")))
    return {"losses": losses, "val_losses": vals, "resumed_from": [s["session"].get("resumed_from") for s in sessions],
            "complete": summary.get("complete"), "stray_files_in_checkpoints": torn}
result = {"one-node": run("one-node"), "kill": run("kill"), "link": run("link")}
for trial in ("kill", "link"):
    r = result[trial]
    r["equal_to_one_node"] = r["losses"] == result["one-node"]["losses"] and r["val_losses"] == result["one-node"]["val_losses"]
result["kill"]["noticed_after_s"] = round(noticed - killed, 2)
result["kill"]["node1_restarted_after_s"] = round(restarted - killed, 2)
result["link"]["noticed_after_s"] = round(noticed_link - down, 2)
result["link"]["link_down_for_s"] = round(up - down, 2)
result["collective_timeout_s"] = timeout
print(f"{'trial':8s} {'noticed after':>13s} {'resumed from':>28s} {'steps':>5s}  complete  equal to one node (bit for bit)")
for trial in ("kill", "link"):
    r = result[trial]
    print(f"{trial:8s} {r['noticed_after_s']:12.1f}s {str(r['resumed_from'][-1]):>28s} {len(r['losses']):5d}  "
          f"{str(r['complete']):8s}  {r['equal_to_one_node']}")
(work / "node-loss.json").write_text(json.dumps(result, indent=1))
sys.exit(0 if all(result[t]["equal_to_one_node"] and result[t]["complete"] for t in ("kill", "link")) else 1)
PY
