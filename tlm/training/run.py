"""`tlm train` as a process: pick the recipe, train, print the figures on rank 0, end the process group, and
say how the run ended (the exit status: 0, or 130 after Ctrl-C with its checkpoint written)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tlm import RECIPES

log = logging.getLogger("tlm")
CONFIGS = RECIPES
CPU_STEP_FLOPS = 1e12  # a step of more than this on a CPU takes minutes (the 26M recipe: 24 TFLOP; the CPU demo: 0.05)
MIN_OPEN_FILES = 64
"""The fewest open files `tlm train` starts with. Measured: the debug recipe on prepared data peaks at 7 in its
process; preparing on first use at about 16 + 4 per tokenizing process (24 with 2, 48 with 8); gloo and NCCL
add sockets per peer. A limit under this is refused up front; an EMFILE later is one line too (tlm.cli)."""


def default_recipe() -> Path:
    """configs/tlm-26m.yaml (the 26M baseline) with a GPU, else configs/cpu-demo.yaml (minutes on a CPU)."""
    import torch

    return CONFIGS / ("tlm-26m.yaml" if torch.cuda.is_available() else "cpu-demo.yaml")


def run_training(config_path: str | list[str] | None, overrides: dict[str, Any], max_config_mb: float = 1.0) -> int:
    """Train (or resume) the run a recipe (or several, composed) and overrides describe; print its sample and JSON
    figures on rank 0. The config, the open-file limit and the run folder are checked before any work.

    Returns the exit status: 130 when Ctrl-C stopped the run (its checkpoint written), else 0.
    """
    from tlm.training.config import load_config
    from tlm.training.preemption import INTERRUPTED
    from tlm.training.session import rerun_hint
    from tlm.training.trainer import shutdown, train

    if config_path is None:
        config_path = str(default_recipe())
        log.info("no --config: using %s", config_path)
    config = load_config(config_path, overrides, max_config_mb)
    check_open_files()
    check_run_folder(config.run_dir)
    warn_gpu_recipe_on_cpu(config)
    try:
        summary = train(config)
    except Exception as e:
        from tlm.training.distributed import lost_peer
        from tlm_base.errors import LostPeerError

        cause = lost_peer(e, config.train.collective_timeout_s)
        if cause is None:
            raise
        if os.environ.get("TLM_LOST_PEER_FILE"):  # for the job script: srun's status is a killed task's, not ours
            Path(os.environ["TLM_LOST_PEER_FILE"]).touch()
        raise LostPeerError(f"{cause}; this rank stops too. The last complete checkpoint is intact: "
                            f"{rerun_hint(config)} once every rank can run") from None
    # The checkpoint is written: a late stop signal (srun forwards USR1 to every task, a second Ctrl-C) must not
    # turn this clean exit into a crash.
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    summary.pop("history")  # every logged record: for in-process callers, not for the printed figures
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        if summary.get("sample"):
            print(summary["sample"])
        print(json.dumps(summary), flush=True)  # the same figures as RUN/summary.json
    shutdown()
    if summary["stopped"] == INTERRUPTED:
        if rank0:
            print(f"tlm: interrupted at step {summary['steps']} of {summary['total_steps']}: checkpoint written to "
                  f"{summary['checkpoint']}; {rerun_hint(config)}", file=sys.stderr, flush=True)
        return 130
    return 0


def warn_gpu_recipe_on_cpu(config: Any) -> None:
    """Say so, before anything is loaded, when a GPU-sized step is about to run on the CPU (rank 0)."""
    import torch

    from tlm.model.flops import flops_per_token

    if os.environ.get("RANK", "0") != "0" or (torch.cuda.is_available() and config.train.device in ("auto", "cuda")):
        return
    shape = config.batch_shape(int(os.environ.get("WORLD_SIZE", "1")))
    step_flops = flops_per_token(config.model, shape.seq_len) * shape.tokens_per_step / shape.world_size
    if step_flops > CPU_STEP_FLOPS:
        log.warning("this recipe is for a GPU: %.1f TFLOP a step (%d x %d tokens) on the CPU here, minutes a step; for "
                    "a CPU demo use --config configs/cpu-demo.yaml (or a smaller model and batch)", step_flops / 1e12,
                    shape.global_batch_size, shape.seq_len)


def open_files_limit() -> str:
    """This process's open-file limit and how to raise it (the end of a one-line error)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    line = f"this process may open {soft} files (ulimit -n); raise the limit, e.g. `ulimit -n 4096`, and rerun"
    if hard != resource.RLIM_INFINITY and hard < 4096:
        line += (f" (the hard limit is {hard}, `ulimit -Hn`: raise it first, as root or in /etc/security/limits.conf; "
                 "in a container with --ulimit nofile=4096)")
    return line


def check_open_files() -> None:
    """Refuse to start with fewer than MIN_OPEN_FILES open files allowed (each rank checks its own process)."""
    import resource

    from tlm_base.errors import TLMError

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES:
        raise TLMError(f"tlm train needs at least {MIN_OPEN_FILES} open files: {open_files_limit()}")


def check_run_folder(run_dir: Path) -> None:
    """Refuse, before any work, a run folder tlm could not create or keep files in (a name too long, a file or a
    device in its place or above it, a kernel file system such as /proc), and a metrics.jsonl that is not a
    regular file (a FIFO would hang the first write): one line naming the path and why."""
    from tlm_base.errors import RankAgreedError, TLMError
    from tlm_base.fileio import check_output_folder
    from tlm.training.metrics import check_metrics_file

    try:
        check_output_folder(run_dir, "run folder", "--logging.run_dir")
    except TLMError as e:
        raise RankAgreedError(str(e)) from None
    path = Path(os.path.abspath(run_dir))
    check_metrics_file(path / "metrics.jsonl")
