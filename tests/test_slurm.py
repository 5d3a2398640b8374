"""The sbatch scripts against a real one-node Slurm (slurm/local-cluster.sh), in CPU mode.

Skipped with the reason when Slurm cannot be started here (not root, packages missing); CI installs the
packages and sets TLM_REQUIRE_SLURM=1, which turns a failed start into a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.prepare import PrepareConfig, prepare

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "slurm"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    state = tmp_path_factory.mktemp("slurm")
    result = subprocess.run([str(SLURM / "local-cluster.sh"), "start", str(state)], capture_output=True, text=True)
    if result.returncode != 0:
        reason = f"Slurm could not be started: {result.stderr.strip()[-300:]}"
        if os.environ.get("TLM_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "TLM_HOME": str(REPO),
           "TLM_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    yield env
    subprocess.run([str(SLURM / "local-cluster.sh"), "stop", str(state)], capture_output=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, data_tokenizer: Path, shakespeare_jsonl: Path) -> Path:
    out = tmp_path_factory.mktemp("slurm-data") / "data"
    prepare(PrepareConfig(data=[str(shakespeare_jsonl)], tokenizer=str(data_tokenizer), out=str(out), seq_len=64,
                          val=0.05), progress=False)
    return out


def submit(env: dict, cwd: Path, script: str, *flags: str, **variables: str) -> str:
    result = subprocess.run(["sbatch", "--parsable", *flags, str(SLURM / script)], cwd=cwd, capture_output=True,
                            text=True, env={**env, **variables})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_states(env: dict, job: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    return re.findall(r"JobState=(\w+)", out)


def wait_for(env: dict, job: str, timeout: float = 300) -> list[str]:
    end = time.time() + timeout
    while time.time() < end:
        states = job_states(env, job)
        if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") for s in states):
            return states
        time.sleep(1)
    raise AssertionError(f"job {job} did not finish in {timeout} s: {job_states(env, job)}")


def train_args(prepared: Path, *extra: str) -> str:
    return " ".join([f"--data.prepared={prepared}", "--logging.sample_prompt=null", "--eval.every=0", *extra])


def output(cwd: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(cwd.glob("slurm-*.out")))


def test_a_two_task_job_trains(cluster: dict, prepared: Path, tmp_path: Path) -> None:
    job = submit(cluster, tmp_path, "pretrain.sbatch", "--ntasks-per-node=2", "--cpus-per-task=1",
                 TLM_CONFIG=str(REPO / "configs" / "debug.yaml"), TLM_ARGS=train_args(prepared, "--train.backend=ddp"))
    assert wait_for(cluster, job) == ["COMPLETED"], output(tmp_path)
    summary = json.loads((tmp_path / "runs" / "debug" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8 and summary["complete"]
    assert "2 tasks, cpu" in output(tmp_path)


def test_a_job_array_runs_one_variant_per_task(cluster: dict, prepared: Path, tmp_path: Path) -> None:
    variants = tmp_path / "variants.txt"
    variants.write_text("# name overrides\nkv1 --model.num_key_value_heads=1\n\nkv4 --model.num_key_value_heads=4\n")
    job = submit(cluster, tmp_path, "ablate.sbatch", "--array=0-1", "--ntasks-per-node=1", "--cpus-per-task=1",
                 TLM_CONFIG=str(REPO / "configs" / "debug.yaml"), TLM_VARIANTS=str(variants),
                 TLM_ARGS=train_args(prepared, "--train.max_steps=3"))
    assert wait_for(cluster, job) == ["COMPLETED", "COMPLETED"], output(tmp_path)
    for name, heads in (("kv1", 1), ("kv4", 4)):
        summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
        state = json.loads((Path(tmp_path / summary["checkpoint"]) / "trainer.json").read_text())
        assert summary["steps"] == 3 and state["config"]["model"]["num_key_value_heads"] == heads


def test_usr1_checkpoints_requeues_and_finishes_like_an_uninterrupted_job(cluster: dict, prepared: Path,
                                                                            tmp_path: Path) -> None:
    variables = {"TLM_CONFIG": str(REPO / "configs" / "debug.yaml"),
                 "TLM_ARGS": train_args(prepared, "--train.backend=ddp", "--train.max_steps=60", "--checkpoint.every=0")}
    reference_dir, preempted_dir = tmp_path / "reference", tmp_path / "preempted"
    reference_dir.mkdir()
    preempted_dir.mkdir()
    reference = submit(cluster, reference_dir, "pretrain.sbatch", "--ntasks-per-node=2", "--cpus-per-task=1", **variables)
    assert wait_for(cluster, reference) == ["COMPLETED"], output(reference_dir)

    job = submit(cluster, preempted_dir, "pretrain.sbatch", "--ntasks-per-node=2", "--cpus-per-task=1", **variables)
    metrics = preempted_dir / "runs" / "debug" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count('"loss"') < 5):
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    assert wait_for(cluster, job) == ["COMPLETED"], output(preempted_dir)

    log = output(preempted_dir)
    assert "USR1 received" in log and f"requeueing job {job}" in log and "(restart 1)" in log
    # the batch script's USR1 handler both forwards the signal and writes the stop file: whichever the trainer sees
    # first is the reason it names (a race, either is right)
    stopped = re.search(r"stopping at step (\d+) \((?:SIGUSR1|stop file [^)]*)\)", log)
    assert stopped and 5 <= int(stopped.group(1)) < 60, log
    assert f"resumed from runs/debug/checkpoints/step-{int(stopped.group(1)):08d}" in log
    final = json.loads((preempted_dir / "runs" / "debug" / "summary.json").read_text())
    expected = json.loads((reference_dir / "runs" / "debug" / "summary.json").read_text())
    assert final["steps"] == 60 and final["final_loss"] == expected["final_loss"]


def test_a_lost_peer_requeues_the_job_a_bounded_number_of_times(cluster: dict, prepared: Path, tmp_path: Path) -> None:
    """A rank that stops answering (here: hangs) ends the other within train.collective_timeout_s with status 75, on
    which slurm/common.sh requeues the job (a node failure is worth a retry); TLM_MAX_REQUEUES bounds it, so a fault
    that comes back every time ends the job as FAILED after one requeue."""
    job = submit(cluster, tmp_path, "pretrain.sbatch", "--ntasks-per-node=2", "--cpus-per-task=1",
                 TLM_CONFIG=str(REPO / "configs" / "debug.yaml"), TLM_FAULT="hang@3:rank1", TLM_MAX_REQUEUES="1",
                 TLM_ARGS=train_args(prepared, "--train.backend=ddp", "--train.collective_timeout_s=3"))
    assert wait_for(cluster, job, timeout=240) == ["FAILED"], output(tmp_path)
    log = output(tmp_path)
    assert log.count("tlm: rank 0 of 2: error: no answer from the other ranks within 3 s") == 2, log
    assert log.count(f"tlm: a rank lost its peers (exit 75): requeueing job {job} (restart 0 of at most 1)") == 1, log
    assert "(restart 1)" in log and "requeueing job" not in log.split("(restart 1)")[-1], log
