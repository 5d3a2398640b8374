"""End to end, as a new user runs it: prepare -> train on 2 processes (deepspeed launcher, torchrun) ->
eval -> generate -> export -> transformers loads the export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline import TINYSHAKESPEARE
from test_cli import last_json, run
from tlm.training.distributed import free_port

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def launch(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, data_tokenizer: Path, shakespeare_jsonl: Path) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "data"
    run("prepare", "--data", str(shakespeare_jsonl), "--tokenizer", str(data_tokenizer), "--out", str(out),
        "--seq_len", "64", "--val", "0.05")
    return out


def train_args(prepared: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(CONFIGS / "debug.yaml"), f"--data.prepared={prepared}",
            f"--logging.run_dir={run_dir}", "--logging.sample_prompt=ROMEO:", *extra]


def test_deepspeed_launcher_then_eval_generate_export(tmp_path: Path, prepared: Path) -> None:
    run_dir = tmp_path / "ds"
    launch([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
            "--module", "tlm", *train_args(prepared, run_dir, "--train.backend=deepspeed", "--train.zero_stage=2")],
           tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8 and summary["complete"]
    assert summary["sample"].startswith("ROMEO:")
    model = Path(summary["model"])

    # tlm eval on the same 8 validation rows the trainer's last evaluation used (2 batches of 4, whatever the ranks)
    figures = last_json(run("eval", "--checkpoint", str(model), "--data", str(prepared), "--batch_size", "8",
                            "--max_batches", "1"))
    assert figures["split"] == "val" and figures["tokens"] == summary["val_tokens"] == 8 * 64
    assert figures["loss"] == pytest.approx(summary["val_loss"], abs=1e-4)
    assert figures["perplexity"] == pytest.approx(torch.tensor(figures["loss"]).exp().item(), rel=1e-6)
    raw = last_json(run("eval", "--checkpoint", str(model), "--data", str(TINYSHAKESPEARE), "--seq_len", "64",
                        "--max_batches", "3"))
    assert raw["tokens"] == 3 * 8 * 64 and 0 < raw["loss"] < 9.3  # ln(6400) = 8.76 before training

    generated = last_json(run("generate", "--checkpoint", str(model), "--prompt", "JULIET:", "--max_new_tokens", "8"))
    assert len(generated["new_token_ids"][0]) <= 8
    run("export", "--checkpoint", str(model), "--out", str(tmp_path / "hf"))
    transformers = pytest.importorskip("transformers")
    from tlm.checkpointing.model_dir import load_model_dir

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 40))
    with torch.no_grad():
        ours, theirs = load_model_dir(model)(ids), hf(ids).logits
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5


def test_torchrun_two_processes(tmp_path: Path, prepared: Path) -> None:
    run_dir = tmp_path / "tr"
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "tlm", *train_args(prepared, run_dir, "--train.backend=ddp", "--logging.sample_prompt=null")], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "ddp" and summary["steps"] == 8
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
