"""The launch/ helpers: the deepspeed launcher with a generated hostfile, and two torchrun "nodes"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from tlm.training.distributed import free_port

REPO = Path(__file__).resolve().parent.parent


def train_flags(prepared: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "debug.yaml"), f"--data.prepared={prepared}",
            "--logging.sample_prompt=null", "--train.max_steps=4", *extra]


def env(**extra: str) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # deepspeed and python3 of this environment
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TLM_PYTHON": sys.executable,
            "HF_HUB_OFFLINE": "1", **extra}


def test_deepspeed_launcher_with_a_generated_hostfile(tmp_path: Path, prepared: Path) -> None:
    result = subprocess.run([str(REPO / "launch" / "deepspeed.sh"), *train_flags(prepared, "--train.backend=deepspeed")],
                            cwd=tmp_path, env=env(NODES="localhost", PROCS_PER_NODE="2"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "hostfile").read_text() == "localhost slots=2\n"
    summary = json.loads((tmp_path / "runs" / "debug" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["backend"] == "deepspeed"


def test_two_torchrun_nodes_on_localhost(tmp_path: Path, prepared: Path) -> None:
    port = str(free_port())
    nodes = [subprocess.Popen([str(REPO / "launch" / "torchrun.sh"), *train_flags(prepared, "--train.backend=ddp")],
                              cwd=tmp_path, env=env(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                                    PROCS_PER_NODE="1", RDZV_ID="test"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "runs" / "debug" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
