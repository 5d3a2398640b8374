"""A rank that fails ends every rank in bounded time, each with one line naming itself and the cause; the run folder
keeps its last complete checkpoint, from which a plain rerun ends with the uninterrupted run's losses.

Two local processes started as two nodes' ranks would be (RANK / WORLD_SIZE / MASTER_ADDR, no launcher to kill the
survivor): what a rank on another node meets when its peer's node fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostile import DEBUG
from tlm.training.distributed import free_port
from tlm.training.metrics import read_metrics


def start_ranks(prepared: Path, run_dir: Path, fault: str = "", **overrides: object) -> list[subprocess.Popen]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "TLM_FAULT": fault}
    values = {"data.prepared": prepared, "logging.run_dir": run_dir, "logging.sample_prompt": "null",
              "logging.wandb": "disabled", "train.max_steps": 8, **overrides}
    args = [sys.executable, "-m", "tlm", "train", "--config", DEBUG, *[f"--{k}={v}" for k, v in values.items()]]
    return [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in range(2)]


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    """(exit status, the stderr lines that are not DeepSpeed's or torch's, seconds waited)."""
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"still running after {timeout} s") from None
    return proc.returncode, err, time.monotonic() - started


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("tlm: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_others_at_once_and_the_rerun_resumes(tmp_path: Path, prepared: Path) -> None:
    reference = tmp_path / "reference"
    assert all(finish(p, 120)[0] == 0 for p in start_ranks(prepared, reference))

    run = tmp_path / "run"
    rank0, rank1 = start_ranks(prepared, run, fault="fail@6:rank1")  # a full disk on rank 1 as step 6 begins
    status1, err1, _ = finish(rank1, 120)
    status0, err0, waited = finish(rank0, 60)
    assert (status0, status1) == (75, 2)  # a lost peer is EX_TEMPFAIL: try again (the Slurm scripts requeue)
    assert one_line(err1).startswith("tlm: rank 1 of 2: error: cannot write the checkpoint folder: No space left")
    assert one_line(err0).startswith("tlm: rank 0 of 2: error: another rank closed its connection (127.0.0.1:")
    assert "it failed or was killed (its own log says why); this rank stops too" in err0
    assert waited < 30  # the connection closed: no timeout needed
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000004"

    assert all(finish(p, 120)[0] == 0 for p in start_ranks(prepared, run))  # the plain rerun
    assert losses(run)[-4:] == losses(reference)[-4:] and len(losses(reference)) == 8
    assert json.loads((run / "summary.json").read_text())["complete"]


@pytest.mark.slow
def test_a_rank_that_hangs_ends_the_others_within_the_collective_timeout(tmp_path: Path, prepared: Path) -> None:
    rank0, rank1 = start_ranks(prepared, tmp_path / "run", fault="hang@3:rank1", **{"train.collective_timeout_s": 5})
    try:
        status0, err0, waited = finish(rank0, 120)
    finally:
        rank1.kill()
        rank1.communicate()
    assert status0 == 75
    assert one_line(err0) == (
        "tlm: rank 0 of 2: error: no answer from the other ranks within 5 s (train.collective_timeout_s): a rank hung, "
        "or its node went down or lost its link; this rank stops too. The last complete checkpoint is intact: rerun "
        "the same command to resume once every rank can run")
    assert waited < 60


def test_the_collective_timeout_is_in_the_help_and_checked() -> None:
    from tlm.cli import command_help
    from tlm.training.config import load_config
    from tlm_base.errors import ConfigError

    assert "stop_grace_s=110.0, collective_timeout_s=300.0" in command_help("train")
    assert load_config(DEBUG).train.collective_timeout_s == 300
    for bad in (0, -1, "nan", "inf"):
        with pytest.raises(ConfigError, match="'train.collective_timeout_s' must be positive"):
            load_config(DEBUG, {"train.collective_timeout_s": bad})
