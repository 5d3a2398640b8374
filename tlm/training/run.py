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

log = logging.getLogger("tlm")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def default_recipe() -> Path:
    """configs/tlm-26m.yaml (the 26M baseline) with a GPU, else configs/cpu-demo.yaml (minutes on a CPU)."""
    import torch

    return CONFIGS / ("tlm-26m.yaml" if torch.cuda.is_available() else "cpu-demo.yaml")


def run_training(config_path: str | None, overrides: dict[str, Any]) -> int:
    """Train (or resume) the run a recipe and overrides describe; print its sample and JSON figures on rank 0.

    Returns the exit status: 130 when Ctrl-C stopped the run (its checkpoint written), else 0.
    """
    from tlm.training.config import load_config
    from tlm.training.preemption import INTERRUPTED
    from tlm.training.trainer import rerun_hint, shutdown, train

    if config_path is None:
        config_path = str(default_recipe())
        log.info("no --config: using %s", config_path)
    config = load_config(config_path, overrides)
    summary = train(config)
    # The checkpoint is written: a late stop signal (srun forwards USR1 to every task, a second Ctrl-C) must not
    # turn this clean exit into a crash.
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    history = summary.pop("history")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        if summary.get("sample"):
            print(summary["sample"])
        summary["losses"] = [h["loss"] for h in history if "loss" in h]
        print(json.dumps(summary), flush=True)
    shutdown()
    if summary["stopped"] == INTERRUPTED:
        if rank0:
            print(f"tlm: interrupted at step {summary['steps']} of {summary['total_steps']}: checkpoint written to "
                  f"{summary['checkpoint']}; {rerun_hint(config)}", file=sys.stderr, flush=True)
        return 130
    return 0
