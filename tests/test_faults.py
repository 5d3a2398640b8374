"""Faults injected into real runs: NaN gradients (skip / stop), corrupt and partial checkpoints, a full disk
while saving, SIGTERM with a grace period, a failing wandb, and kill -9 of a 2-process ZeRO-2 run (also while
it writes a checkpoint). See docs/reliability.md."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tlm_base.errors import CheckpointError, TrainingError
from tlm.training.trainer import train
from tlm.training.config import load_config
from tlm.checkpointing.layout import verify
from tlm.checkpointing.lineage import find_resume

REPO = Path(__file__).resolve().parent.parent


def settings(prepared: Path, run_dir: Path, **overrides) -> dict:
    return {"data.prepared": str(prepared), "logging.run_dir": str(run_dir), "logging.sample_prompt": None,
            "logging.wandb": "disabled", "eval.every": 0, "checkpoint.every": 0, "schedule.kind": "constant",
            **overrides}


def run(prepared: Path, run_dir: Path, **overrides) -> dict:
    return train(load_config(REPO / "configs" / "debug.yaml", settings(prepared, run_dir, **overrides)))


def weights(summary: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(summary["model"]) / "model.safetensors"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- NaN / Inf -------------------------------------------------------------------------------------------

SKIPPING = {"single": {"train.backend": "single"},
            "zero0": {"train.backend": "deepspeed", "train.zero_stage": 0},
            "zero2": {"train.backend": "deepspeed", "train.zero_stage": 2},
            "fsdp2": {"train.backend": "fsdp2"}}


@pytest.mark.parametrize("backend", SKIPPING)
def test_a_nan_step_is_skipped_and_counted(tmp_path: Path, prepared: Path, backend: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 3's gradients are NaN: its update is not applied (the weights equal a 2-step run's: constant
    lr, so the schedule cannot hide it), it is counted and logged, and training goes on."""
    two = run(prepared, tmp_path / "two", **SKIPPING[backend], **{"train.max_steps": 2})
    monkeypatch.setenv("TLM_FAULT", "nan@3")
    three = run(prepared, tmp_path / "three", **SKIPPING[backend], **{"train.max_steps": 3})
    assert three["skipped_steps"] == 1 and three["complete"]
    skipped = [m for m in metrics(tmp_path / "three") if m.get("skipped_step")]
    assert [m["step"] for m in skipped] == [3]
    a, b = weights(two), weights(three)
    assert all(torch.equal(a[k], b[k]) for k in a), "the NaN step changed the weights"


def test_nan_policy_stop_keeps_the_last_good_checkpoint(tmp_path: Path, prepared: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    monkeypatch.setenv("TLM_FAULT", "nan@3")
    with pytest.raises(TrainingError, match="non-finite gradients at step 3"):
        run(prepared, run_dir, **{"train.max_steps": 6, "checkpoint.every": 2, "train.nan_policy": "stop"})
    dump = json.loads((run_dir / "nonfinite-step-00000003.json").read_text())
    assert dump["last_good_checkpoint"].endswith("step-00000002") and dump["why"] == "train.nan_policy is stop"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000002"]
    monkeypatch.delenv("TLM_FAULT")
    resumed = run(prepared, run_dir, **{"train.max_steps": 6, "checkpoint.every": 2, "train.nan_policy": "stop"})
    assert resumed["complete"] and resumed["skipped_steps"] == 0


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path: Path, prepared: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLM_FAULT", "nan@2,nan@3")
    with pytest.raises(TrainingError, match="2 steps in a row were skipped"):
        run(prepared, tmp_path / "run", **{"train.max_steps": 6, "train.max_skipped_steps": 1})


# --- checkpoints -----------------------------------------------------------------------------------------

def test_corrupt_and_partial_checkpoints_are_never_loaded(tmp_path: Path, prepared: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run(prepared, run_dir, **{"train.max_steps": 6, "checkpoint.every": 2, "checkpoint.keep_last": 3})
    root = run_dir / "checkpoints"
    assert find_resume(run_dir, "auto") == root / "step-00000006"
    assert (root / "latest").read_text().strip() == "step-00000006"
    (root / "step-00000006" / "COMPLETE").unlink()  # killed before the marker: incomplete
    weights_file = root / "step-00000004" / "model" / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit: same size, other sha256
    weights_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="tlm"):
        assert find_resume(run_dir, "auto") == root / "step-00000002"
    assert "does not match its sha256" in caplog.text and "incomplete" in caplog.text
    state = root / "step-00000002" / "backend" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    assert "has 1000 bytes" in verify(root / "step-00000002")
    with pytest.raises(CheckpointError, match="no sound checkpoint"):
        find_resume(run_dir, "auto")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        find_resume(run_dir, str(root / "step-00000004"))


def _cli(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TLM_FAULT": ""}
    return subprocess.Popen([sys.executable, "-m", "tlm", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _args(prepared: Path, run_dir: Path, **overrides) -> list[str]:
    merged = {"config": str(REPO / "configs" / "debug.yaml"), **settings(prepared, run_dir, **overrides)}
    return [f"--{k}={v}" for k, v in merged.items()]


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, prepared: Path) -> None:
    """Writes past a file-size limit fail as on a full disk (EFBIG instead of ENOSPC): a one-line error, the
    partial checkpoint removed, the previous one intact; with room again, the run resumes and finishes."""
    run_dir = tmp_path / "run"
    args = _args(prepared, run_dir, **{"train.max_steps": 4, "checkpoint.every": 2})
    first = _cli([*args, "--train.stop_at=2"])
    assert first.wait(300) == 0, first.stderr.read()[-2000:]

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the weights need ~2 MB

    full = _cli(args, preexec_fn=small_disk)
    assert full.wait(300) == 2
    error = full.stderr.read()
    assert "could not write the checkpoint of step 4" in error and "File too large" in error, error[-2000:]
    assert "step-00000002 is intact" in error and "Traceback" not in error
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002"] and verify(root / "step-00000002") is None
    again = _cli(args)
    assert again.wait(300) == 0 and json.loads((run_dir / "summary.json").read_text())["complete"]


# --- SIGTERM and the grace period ------------------------------------------------------------------------

def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(json.loads(x).get("step", 0) >= step for x in path.read_text().splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {run_dir}: {proc.poll()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the terminal or ssh session closed
def test_sigterm_checkpoints_and_exits_within_the_grace_period(tmp_path: Path, prepared: Path, sig: int) -> None:
    run_dir = tmp_path / "run"
    proc = _cli(_args(prepared, run_dir, **{"train.max_steps": 100000, "train.stop_grace_s": 60}))
    _wait_for_step(run_dir, proc, 3)
    sent = time.time()
    proc.send_signal(sig)
    assert proc.wait(120) == 0, proc.stderr.read()[-2000:]
    assert time.time() - sent < 60
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == signal.Signals(sig).name and not summary["complete"]
    assert verify(find_resume(run_dir, "auto")) is None and summary["steps"] >= 3


def test_past_the_grace_period_the_trainer_exits_anyway(tmp_path: Path, prepared: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _cli(_args(prepared, run_dir, **{"train.max_steps": 100000, "train.stop_grace_s": 0.001,
                                            "checkpoint.every": 2}))
    _wait_for_step(run_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143
    assert "train.stop_grace_s" in proc.stderr.read()
    found = find_resume(run_dir, "auto")  # whatever the exit cut short was not made visible
    assert found is None or verify(found) is None


# --- wandb -----------------------------------------------------------------------------------------------

WANDB_DRIVER = """
import json, os, signal, sys, time
from pathlib import Path
from tlm.training.metrics import WandbLogger
from tlm.training.trainer import train
from tlm.training.config import load_config

original = WandbLogger.log

def kill_wandb_then_log(self, record, step):  # its service process dies mid-run (SIGKILL)
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        for child in (task / "children").read_text().split():
            if "wandb-core" in Path(f"/proc/{child}/cmdline").read_text():
                os.kill(int(child), signal.SIGKILL)
                time.sleep(0.5)
    return original(self, record, step)

if sys.argv[3] == "kill":
    WandbLogger.log = kill_wandb_then_log
print(json.dumps({"complete": train(load_config(sys.argv[1], json.loads(sys.argv[2])))["complete"]}))
"""


@pytest.mark.parametrize("failure", ["bad-key", "kill"])
def test_a_failing_wandb_never_stops_training(tmp_path: Path, prepared: Path, failure: str) -> None:
    """A bad key with no network (init fails), or wandb's service process SIGKILLed mid-run (logging fails):
    one warning, training goes on, metrics.jsonl has every step. In a subprocess: a killed service breaks
    wandb for the rest of its process."""
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    mode = "online" if failure == "bad-key" else "offline"
    overrides = settings(prepared, run_dir, **{"train.max_steps": 3, "logging.wandb": mode})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TLM_FAULT": "", "WANDB_API_KEY": "not-a-key", "WANDB_INIT_TIMEOUT": "20"}
    result = subprocess.run([sys.executable, "-c", WANDB_DRIVER, str(REPO / "configs" / "debug.yaml"),
                             json.dumps(overrides), failure], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["complete"]
    warning = "wandb online is off" if failure == "bad-key" else "wandb logging failed"
    assert warning in result.stderr, result.stderr[-3000:]
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == [1, 2, 3]


# --- kill -9 of a 2-process ZeRO-2 run -------------------------------------------------------------------

def _fault_script():
    spec = importlib.util.spec_from_file_location("fault_inject", REPO / "scripts" / "fault_inject.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    """A bounded sample of scripts/fault_inject.py: a kill of rank 0 between its checkpoint files and the
    COMPLETE marker, and a SIGKILL of both ranks at a random step plus a random delay; each resumed run ends bit-identical
    (fp32) to the uninterrupted one."""
    import random

    faults = _fault_script()
    prepared = faults.prepare_data(tmp_path)
    reference = faults.Job(prepared, tmp_path / "reference", steps=8)
    assert reference.run() == 0
    expected = reference.weights()

    in_save = faults.Job(prepared, tmp_path / "in-save", steps=8)
    assert in_save.run("kill_in_save@4:rank0") != 0
    partial = tmp_path / "in-save" / "checkpoints" / "step-00000004"
    assert partial.is_dir() and verify(partial) is not None  # left behind, incomplete
    in_save.finish()
    assert faults.identical(expected, in_save.weights())

    anywhere = faults.Job(prepared, tmp_path / "anywhere", steps=8)
    rng = random.Random(os.getpid())
    what = anywhere.kill_at(rng.randint(1, 7), rng.uniform(0, 0.5), "all")
    assert what.startswith("SIGKILL"), what
    anywhere.finish()
    assert faults.identical(expected, anywhere.weights())
