"""The speed options are correct: fused AdamW, chunked loss and torch.compile give the same losses; tlm bench
prints its figures; on CUDA the step loop does not synchronise with the host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlm.training.trainer import train
from tlm.training.config import load_config

REPO = Path(__file__).resolve().parent.parent


def losses(prepared: Path, run_dir: Path, **overrides) -> list[float]:
    config = load_config(REPO / "configs" / "debug.yaml", {
        "data.prepared": str(prepared), "logging.run_dir": str(run_dir), "logging.sample_prompt": None,
        "logging.wandb": "disabled", "train.max_steps": 4, "checkpoint.every": 0, "eval.every": 0, **overrides})
    return [h["loss"] for h in train(config)["history"] if "loss" in h]


@pytest.mark.parametrize("option", [{"train.fused_adamw": True}, {"train.loss_chunk": 50},
                                    {"train.loss_chunk": 50, "batch.micro_batch_size": 2}])
def test_speed_options_keep_the_losses(tmp_path: Path, prepared: Path, option: dict) -> None:
    reference = losses(prepared, tmp_path / "reference")
    for a, b in zip(reference, losses(prepared, tmp_path / "option", **option)):
        assert abs(a - b) < 1e-5, (reference, option)


def test_compiled_model_keeps_the_losses(tmp_path: Path, prepared: Path) -> None:
    reference = losses(prepared, tmp_path / "eager", **{"train.max_steps": 3})
    compiled = losses(prepared, tmp_path / "compiled", **{"train.max_steps": 3, "train.compile": True})
    for a, b in zip(reference, compiled):
        assert abs(a - b) < 1e-4, (reference, compiled)


def test_bench_prints_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "tlm", "bench", "--preset", "debug", "--batch", "2", "--seq_len", "32",
                             "--steps", "2", "--warmup", "1", "--loss_chunk", "16", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    row = figures["rows"]["single"]
    assert row["tokens_per_s"] > 0 and row["step_time"] > 0 and 0 < row["mfu_vs_measured_matmul"]
    assert figures["flops_per_token"] > 0 and figures["measured_matmul_flops"] > 0
    assert json.loads(out.read_text()) == figures
    assert "tokens/s" in result.stderr and "MFU" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_step_loop_never_waits_for_the_gpu(tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a training step nothing reads a GPU value back: synchronising calls raise in this mode
    (the loss is read only at log steps, outside the step)."""
    from tlm.training.trainer import Trainer

    original = Trainer.train_step
    calls = {"n": 0}

    def strict(self):
        calls["n"] += 1
        if calls["n"] <= 2:  # first steps: lazy CUDA initialisation may synchronise
            return original(self)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(self)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "train_step", strict)
    # nan_policy off: the NaN check reads the grad norm back once a step (docs/performance.md)
    assert len(losses(prepared, tmp_path / "run", **{"train.max_steps": 6, "train.precision": "bf16",
                                                     "train.nan_policy": "off"})) == 6
