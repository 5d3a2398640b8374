#!/usr/bin/env bash
# What users of the deepspeed CLI type on a cluster, on two "nodes" of one Linux machine (network namespaces,
# scripts/netns_nodes.sh): `deepspeed --hostfile` started on node 0, reaching both nodes over ssh (pdsh, DeepSpeed's
# default multi-node runner), trains the debug preset with DeepSpeed ZeRO-2 (one rank per node) to the losses of one
# node running both ranks. Each namespace runs an sshd on its own address with a host key and a client key made for
# this run (nothing of the machine's ssh setup is read or changed: the client's options come from an ssh wrapper
# first in PATH). Prints a table, writes WORK/result.json; needs root, sshd, ssh and pdsh (apt-get install
# openssh-server pdsh).
#
#   sudo scripts/two_nodes_ssh.sh [WORK_DIR]      (TLM_PYTHON=... for the python with tlm installed)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/scripts/netns_nodes.sh"
two_nodes_start two_nodes_ssh "${1:-}" "apt-get install openssh-server openssh-client pdsh" ssh ssh-keygen pdsh \
    /usr/sbin/sshd
stop_sshd() { for i in 0 1; do [ -f "$WORK/sshd$i.pid" ] && kill "$(cat "$WORK/sshd$i.pid")" 2>/dev/null || true; done; }
trap 'stop_sshd; nodes_down' EXIT
nodes_up
cd "$REPO"

# keys for this run, an sshd per namespace on its address, and an ssh that uses them
rm -f "$WORK/host_key" "$WORK/client_key"
ssh-keygen -q -t ed25519 -N "" -f "$WORK/host_key"
ssh-keygen -q -t ed25519 -N "" -f "$WORK/client_key"
cp "$WORK/client_key.pub" "$WORK/authorized_keys"
mkdir -p /run/sshd "$WORK/bin"
for i in 0 1; do
    cat >"$WORK/sshd$i.conf" <<CONF
ListenAddress ${ADDR[$i]}
Port 22
HostKey $WORK/host_key
AuthorizedKeysFile $WORK/authorized_keys
PidFile $WORK/sshd$i.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
CONF
    ip netns exec "${NS[$i]}" /usr/sbin/sshd -f "$WORK/sshd$i.conf" -E "$WORK/sshd$i.log"
done
cat >"$WORK/bin/ssh" <<WRAP
#!/bin/sh
exec /usr/bin/ssh -i "$WORK/client_key" -o IdentitiesOnly=yes -o StrictHostKeyChecking=no \
    -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR "\$@"
WRAP
chmod +x "$WORK/bin/ssh"
# what every rank's environment needs, exported by the deepspeed launcher on each node (its .deepspeed_env file)
printf '%s\n' GLOO_SOCKET_IFNAME=tlm0 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled DS_ACCELERATOR=cpu \
    TOKENIZERS_PARALLELISM=false >"$WORK/ds_env"
for i in 0 1; do
    ip netns exec "${NS[0]}" env PATH="$WORK/bin:$PATH" ssh "${ADDR[$i]}" true ||
        { echo "two_nodes_ssh: ssh from node 0 to ${ADDR[$i]} failed (see $WORK/sshd$i.log)"; exit 1; }
done
echo "sshd on ${ADDR[0]} and ${ADDR[1]}; node 0 reaches both with this run's key"

prepare_data
reference_run
echo "== deepspeed --hostfile over ssh (pdsh), started on node 0 alone"
ip netns exec "${NS[0]}" env PATH="$WORK/bin:$PATH" DS_ENV_FILE="$WORK/ds_env" NODES="${ADDR[*]}" MASTER_PORT=29513 \
    HOSTFILE="$WORK/hostfile" PROCS_PER_NODE=1 "${NODE_ENV[@]}" \
    timeout 300 launch/deepspeed.sh "${COMMON[@]}" --logging.run_dir="$WORK/deepspeed-ssh" >"$WORK/deepspeed-ssh.log" 2>&1
grep -m1 "cmd = pdsh" "$WORK/deepspeed-ssh.log" | sed "s#$WORK#WORK#g; s#--world_info=[^ ]*#--world_info=...#" || true
compare_losses deepspeed-ssh
