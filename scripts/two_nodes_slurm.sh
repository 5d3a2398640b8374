#!/usr/bin/env bash
# A two-node Slurm on one Linux machine: two network namespaces joined by a veth pair (10.231.0.1, 10.231.0.2;
# the interface is called tlm0 in both, so GLOO_SOCKET_IFNAME=tlm0 holds on every node), slurmctld and one
# slurmd in the first, a second slurmd in the other. Then `sbatch --nodes=2 slurm/pretrain-multinode.sbatch`
# trains the debug preset with DeepSpeed ZeRO-2, one task per node (srun starts both ranks), and its losses are
# compared with one node running both processes. Needs root and Debian's slurmctld, slurmd, munge.
# NODE_LOSS=1 adds a node lost mid-run: a 40-step job (a checkpoint every 10), and once step 14 is logged every
# process of node 1 is killed -9 (its slurmd, slurmstepd and rank); node 0's rank exits 75 at once (its peer is
# gone), the job requeues itself (slurm/common.sh), node 1's slurmd is restarted RESTART_AFTER_S later as a
# rebooted node would be, and the requeued job resumes from step 10 to the one-node run's losses bit for bit.
#
#   sudo scripts/two_nodes_slurm.sh [WORK_DIR]      (TLM_PYTHON=... the python with tlm installed)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
NAMES=(tlmnode0 tlmnode1)
source "$REPO/scripts/netns_nodes.sh"
two_nodes_start two_nodes_slurm "${1:-}" "apt-get install slurmctld slurmd slurm-client munge" slurmctld slurmd \
    sbatch munge nsenter

cleanup() {
    for f in "$WORK"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
    sleep 1
    nodes_down
    sed -i '/# tlm-two-nodes$/d' /etc/hosts
}
trap cleanup EXIT
nodes_up
for i in 0 1; do echo "${ADDR[$i]} ${NAMES[$i]} # tlm-two-nodes" >>/etc/hosts; done

# munge (a unix socket: both namespaces share the filesystem)
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -f /etc/munge/munge.key ] || mungekey --create >/dev/null 2>&1
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/tlm-munged.pid --log-file=/run/munge/tlm-munged.log \
        --force >/dev/null 2>&1 || true
    sleep 1
fi

# The daemons enter only the network namespaces (nsenter), not `ip netns exec`'s private /sys, which lacks the
# cgroup filesystem slurmd initialises.
hw=$(slurmd -C | head -n1)
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
mkdir -p "$WORK/ctld" "$WORK/spool-${NAMES[0]}" "$WORK/spool-${NAMES[1]}"
cat >"$WORK/slurm.conf" <<EOF
ClusterName=tlm-two-nodes
SlurmctldHost=$(hostname -s)(${ADDR[0]})
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=/run/munge/munge.socket.2
StateSaveLocation=$WORK/ctld
SlurmdSpoolDir=$WORK/spool-%n
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd-%n.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=${SLURMD_TIMEOUT:-20}
NodeName=${NAMES[0]} NodeAddr=${ADDR[0]} CPUs=$cpus State=UNKNOWN
NodeName=${NAMES[1]} NodeAddr=${ADDR[1]} CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=${NAMES[0]},${NAMES[1]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
export SLURM_CONF=$WORK/slurm.conf
nsenter --net=/var/run/netns/${NS[0]} slurmctld -i -f "$SLURM_CONF" >"$WORK/slurmctld.out" 2>&1
for i in 0 1; do nsenter --net=/var/run/netns/${NS[$i]} slurmd -f "$SLURM_CONF" -N "${NAMES[$i]}" >"$WORK/slurmd$i.out" 2>&1; done
for _ in $(seq 100); do
    [ "$(ip netns exec "${NS[0]}" sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr -d '\n')" = idle ] && break
    sleep 0.3
done
ip netns exec "${NS[0]}" sinfo -N

cd "$REPO"
prepare_data
reference_run
ARGS="${COMMON[*]:2}"  # all but --config, which the sbatch script takes from TLM_CONFIG

echo "== sbatch --nodes=2 slurm/pretrain-multinode.sbatch (srun: one rank per node)"
job=$(ip netns exec "${NS[0]}" env TLM_HOME="$REPO" TLM_PYTHON="$PY" TLM_CONFIG=configs/debug.yaml \
    TLM_ARGS="$ARGS --logging.run_dir=$WORK/slurm" "${NODE_ENV[@]}" \
    sbatch --parsable --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 --chdir="$REPO" \
    --output="$WORK/slurm-%j.out" slurm/pretrain-multinode.sbatch)
echo "job $job"
for _ in $(seq 600); do
    state=$(ip netns exec "${NS[0]}" squeue -h -j "$job" -o '%T' 2>/dev/null || true)
    [ -z "$state" ] && break
    sleep 1
done
tail -n 5 "$WORK/slurm-$job.out"

compare_losses slurm
[ -n "${NODE_LOSS:-}" ] || exit 0

echo "== a node lost: 40 steps, every process of node 1 killed after step 14, the job requeues itself"
LOSS_ARGS=${ARGS/--train.backend=deepspeed --train.zero_stage=2/--train.backend=single}
LOSS_ARGS=${LOSS_ARGS/--train.max_steps=6/--train.max_steps=40}
LOSS_ARGS="${LOSS_ARGS/--eval.every=3/--eval.every=10} --checkpoint.every=10 --checkpoint.keep_last=3"
PROCS_PER_NODE=2 OMP_NUM_THREADS=1 TLM_PYTHON=$PY launch/torchrun.sh --config configs/debug.yaml $LOSS_ARGS \
    --logging.run_dir="$WORK/one-node-40" >"$WORK/one-node-40.log" 2>&1
job=$(ip netns exec "${NS[0]}" env TLM_HOME="$REPO" TLM_PYTHON="$PY" TLM_CONFIG=configs/debug.yaml \
    TLM_ARGS="$LOSS_ARGS --logging.run_dir=$WORK/slurm-loss" "${NODE_ENV[@]}" \
    sbatch --parsable --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 --chdir="$REPO" \
    --output="$WORK/slurm-loss-%j.out" slurm/pretrain-multinode.sbatch)
echo "job $job"
until [ -f "$WORK/slurm-loss/metrics.jsonl" ] && grep -q '"step": 1[4-9], "loss"' "$WORK/slurm-loss/metrics.jsonl"; do sleep 0.1; done
killed=$(date +%s.%N)
ip netns pids "${NS[1]}" | xargs -r kill -9
until grep -q "requeueing job" "$WORK/slurm-loss-$job.out" 2>/dev/null; do sleep 0.1; done
requeued=$(date +%s.%N)
sleep "${RESTART_AFTER_S:-5}"
nsenter --net=/var/run/netns/${NS[1]} slurmd -f "$SLURM_CONF" -N "${NAMES[1]}" >>"$WORK/slurmd1.out" 2>&1
for _ in $(seq 900); do
    state=$(ip netns exec "${NS[0]}" squeue -h -j "$job" -o '%T' 2>/dev/null || true)
    [ -z "$state" ] && break
    sleep 1
done
ended=$(date +%s.%N)
grep "^tlm:" "$WORK/slurm-loss-$job.out" | sed "s#$WORK#WORK#g"
"$PY" - "$WORK" "$killed" "$requeued" "$ended" <<'PY'
import json, sys
from pathlib import Path
from tlm.training.metrics import line_of_descent, read_metrics
work = Path(sys.argv[1])
killed, requeued, ended = map(float, sys.argv[2:5])
def run(name):
    records = line_of_descent(read_metrics(work / name / "metrics.jsonl"))
    return [r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r]
mine, reference = run("slurm-loss"), run("one-node-40")
sessions = [json.loads(l)["session"] for l in (work / "slurm-loss" / "metrics.jsonl").read_text().splitlines() if '"session"' in l]
summary = json.loads((work / "slurm-loss" / "summary.json").read_text())
result = {"requeued_after_s": round(requeued - killed, 2), "ended_after_s": round(ended - killed, 2),
          "resumed_from": [s.get("resumed_from") for s in sessions], "complete": summary["complete"],
          "steps": len(mine[0]), "equal_to_one_node": mine == reference, "losses": mine[0], "val_losses": mine[1]}
print(f"requeued {result['requeued_after_s']} s after the kill; resumed from {result['resumed_from'][-1]}; "
      f"{result['steps']} steps, complete {result['complete']}; equal to one node bit for bit: {result['equal_to_one_node']}")
(work / "slurm-node-loss.json").write_text(json.dumps(result, indent=1))
sys.exit(0 if result["equal_to_one_node"] and result["complete"] else 1)
PY
