"""Training figures: FLOPs per token and MFU, the JSONL metrics file, and wandb (imported only when used).

FLOPs per token (forward + backward = 3 x forward), the PaLM / nanoGPT accounting:

    6 * N_matmul + 12 * num_hidden_layers * (num_attention_heads * head_dim) * seq_len

N_matmul counts the weights every token multiplies through: the q/k/v/o and MLP projections of every
layer plus the output projection (hidden x vocab, counted once even when tied to the embedding; the
embedding lookup itself is free). The second term is attention's QK^T and AV products over the full
seq_len window (causal masking is not discounted, as in PaLM's MFU). MFU = FLOPs per token x tokens/s
/ the device's peak dense bf16 FLOP/s, from the table below; CPUs have no stated peak (tokens/s only).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tlm.config import ModelConfig

log = logging.getLogger("tlm")

# Dense bf16 peak FLOP/s per device (vendor datasheets, SXM / no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def matmul_params(config: ModelConfig) -> int:
    h, d = config.hidden_size, config.head_dim
    attention = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = (3 if config.mlp == "swiglu" else 2) * h * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + h * config.vocab_size


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (see the module docstring)."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matmul_params(config) + attention


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device, matched by name (None when unknown, e.g. CPUs)."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name.upper():
            return value
    return None


class MetricsFile:
    """Appends one JSON object per line; flushed at once so a crash loses nothing already logged."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class WandbLogger:
    """wandb when asked for; never imported otherwise. A failing wandb warns and turns itself off."""

    def __init__(self, mode: str, project: str, name: str, config: dict[str, Any], run_dir: Path) -> None:
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "disabled"
        self.mode = mode
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir), mode=mode,
                                  resume="allow", id=_run_id(run_dir))
        except Exception as e:  # no key, no network, bad settings: training goes on
            log.warning("wandb %s is off: %s: %s", mode, type(e).__name__, e)
            self.run = None

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(record, step=step)
        except Exception as e:
            log.warning("wandb logging failed, turning it off: %s", e)
            self.run = None

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:
                log.warning("wandb finish failed: %s", e)


def _run_id(run_dir: Path) -> str:
    """A stable wandb run id per run folder, so a resumed run continues the same wandb run."""
    path = run_dir / "wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id)
    return run_id


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                mininterval=1.0)
