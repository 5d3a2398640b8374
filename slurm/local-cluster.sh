#!/usr/bin/env bash
# A real one-node Slurm on this machine, for tests and for trying the sbatch scripts without a cluster.
#
#   slurm/local-cluster.sh start STATE_DIR [--install]   # prints "export SLURM_CONF=..." on success
#   slurm/local-cluster.sh stop STATE_DIR                # stops the daemons it started, by PID
#   slurm/local-cluster.sh status STATE_DIR
#
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge (--install apt-installs them). The
# configuration lives in STATE_DIR (SLURM_CONF points clients at it); nothing under /etc/slurm is touched.
# Jobs requeue quickly (cred_expire=10, sched_interval=5) so that preemption tests finish in seconds.
set -euo pipefail

cmd=${1:-}
state=${2:-}
[ -n "$cmd" ] && [ -n "$state" ] || { echo "usage: $0 start|stop|status STATE_DIR [--install]" >&2; exit 2; }
mkdir -p "$state"
state=$(cd "$state" && pwd)
conf="$state/slurm.conf"

alive() {  # a PID that exists and is not a zombie
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null
}

stop() {
    for name in slurmd slurmctld munged; do
        pidfile="$state/$name.pid"
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        if alive "$pid"; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
            alive "$pid" && kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "$cmd" in
stop)
    stop
    exit 0
    ;;
status)
    SLURM_CONF=$conf sinfo
    exit 0
    ;;
start) ;;
*)
    echo "unknown command '$cmd'" >&2
    exit 2
    ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "local-cluster: needs root (slurmd runs jobs as their user, munged needs its own user)" >&2
    exit 3
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    if [ "${3:-}" = "--install" ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            slurmctld slurmd slurm-client munge >"$state/apt.log" 2>&1 ||
            { echo "local-cluster: apt-get install failed, see $state/apt.log" >&2; exit 4; }
    else
        echo "local-cluster: slurmctld/munged not installed (run with --install, or apt-get install slurmctld slurmd slurm-client munge)" >&2
        exit 4
    fi
fi
stop  # a previous run's daemons, if any

# munge: reuse a working one; otherwise start munged as the munge user (as root it refuses its log
# file), with its files in /run/munge (the state folder may not be readable by that user).
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -f /etc/munge/munge.key ] || mungekey --create >/dev/null 2>&1
    mkdir -p /run/munge
    chown munge:munge /run/munge
    rm -f /run/munge/tlm-munged.pid
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/tlm-munged.pid \
        --log-file=/run/munge/tlm-munged.log --force >/dev/null 2>&1 || true
    for _ in $(seq 50); do [ -s /run/munge/tlm-munged.pid ] && break; sleep 0.1; done
    cp /run/munge/tlm-munged.pid "$state/munged.pid" 2>/dev/null || true
    munge -n | unmunge >/dev/null ||
        { echo "local-cluster: munge does not work (see /run/munge/tlm-munged.log)" >&2; exit 5; }
fi

node=$(hostname -s)
getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >>/etc/hosts
hw=$(slurmd -C | head -n1)
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
sockets=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
mkdir -p "$state/ctld" "$state/spool"
cat >"$conf" <<EOF
ClusterName=tlm-local
SlurmctldHost=$node
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10,socket=/run/munge/munge.socket.2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
NodeName=$node CPUs=$cpus SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$((memory * 95 / 100)) State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

export SLURM_CONF=$conf
slurmctld -i -f "$conf" >"$state/slurmctld.out" 2>&1
slurmd -f "$conf" -N "$node" >"$state/slurmd.out" 2>&1
for _ in $(seq 100); do
    nodestate=$(sinfo -h -N -o '%t' 2>/dev/null | head -n1)
    case "$nodestate" in
    idle*) break ;;
    down* | drain*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
if [ "$(sinfo -h -N -o '%t' 2>/dev/null | head -n1)" != idle ]; then
    echo "local-cluster: node $node did not become idle (see $state/slurmctld.log, $state/slurmd.log)" >&2
    stop
    exit 6
fi
echo "export SLURM_CONF=$conf"
