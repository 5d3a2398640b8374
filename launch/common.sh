# Sourced by the launch scripts: the environment every launcher needs.
# OMP_NUM_THREADS: cores / processes on this node unless set (the deepspeed launcher sets none, and two
# processes with one thread per core each run 2.5x slower on a 2-core machine).
tlm_procs_per_node() {
    if [ -n "${PROCS_PER_NODE:-}" ]; then echo "$PROCS_PER_NODE"; return; fi
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then nvidia-smi -L | wc -l; else echo 1; fi
}
tlm_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}
PROCS=$(tlm_procs_per_node)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / PROCS > 0 ? $(nproc) / PROCS : 1 ))}
export TOKENIZERS_PARALLELISM=false
TLM_PYTHON=${TLM_PYTHON:-python3}
