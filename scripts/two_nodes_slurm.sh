#!/usr/bin/env bash
# A two-node Slurm on one Linux machine: two network namespaces joined by a veth pair (10.231.0.1, 10.231.0.2;
# the interface is called tlm0 in both, so GLOO_SOCKET_IFNAME=tlm0 holds on every node), slurmctld and one
# slurmd in the first, a second slurmd in the other. Then `sbatch --nodes=2 slurm/pretrain-multinode.sbatch`
# trains the debug preset with DeepSpeed ZeRO-2, one task per node (srun starts both ranks), and its losses are
# compared with one node running both processes. Needs root and Debian's slurmctld, slurmd, munge.
#
#   sudo scripts/two_nodes_slurm.sh [WORK_DIR]      (TLM_PYTHON=... the python with tlm installed)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d -t tlm-slurm2-XXXX)}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
PY=${TLM_PYTHON:-python3}
NAMES=(tlmnode0 tlmnode1)
source "$REPO/scripts/netns_nodes.sh"

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
