"""The run folder under hostile conditions: a second trainer in it, Ctrl-C (once, twice, under torchrun), a
full disk while metrics are written, a torn metrics line, a read-only folder. One owner, one line, nothing
lost."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from hostile import REPO, child, cli, hold_lock, refused, snapshot, train_args
from tlm.training.metrics import read_metrics
from tlm.checkpointing.layout import verify
from tlm.checkpointing.lineage import find_resume


def wait_for_step(run_dir: Path, proc, step: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        path = run_dir / "metrics.jsonl"
        if path.is_file():
            steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.endswith("}")]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {run_dir}: exit {proc.poll()} {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")


def tlm_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("tlm:")]


def test_a_second_trainer_is_refused_naming_the_first(tmp_path: Path, prepared: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    first = child(train_args(prepared, run_dir, **{"train.max_steps": 100000, "checkpoint.every": 0}))
    try:
        wait_for_step(run_dir, first, 1)
        before = snapshot(run_dir / "checkpoints") if (run_dir / "checkpoints").exists() else {}
        refused(train_args(prepared, run_dir, **{"optim.lr": 0.01}), capsys,
                f"run folder '{run_dir}' is in use by pid {first.pid} on", "tlm train", "another --logging.run_dir")
        assert (snapshot(run_dir / "checkpoints") if (run_dir / "checkpoints").exists() else {}) == before
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: it must not block the next run
        first.wait(30)
    status, _, err = cli(train_args(prepared, run_dir, **{"train.max_steps": 2, "checkpoint.resume": "none"}), capsys)
    assert status == 0, err


def test_the_ablation_runner_and_its_trainer_share_one_claim(tmp_path: Path, prepared: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """A folder claimed by another process is skipped by `tlm ablate`; claimed by this one, it trains."""
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        refused(train_args(prepared, run_dir), capsys, f"is in use by pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait(30)
    from tlm_base.locks import FolderLock

    with FolderLock(run_dir, "run folder"):
        status, _, err = cli(train_args(prepared, run_dir, **{"train.max_steps": 2}), capsys)
    assert status == 0, err


def test_ctrl_c_checkpoints_and_exits_130(tmp_path: Path, prepared: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    args = train_args(prepared, run_dir, **{"train.max_steps": 5000, "checkpoint.every": 0})
    proc = child(args)
    wait_for_step(run_dir, proc, 3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130
    err = proc.stderr.read()
    summary = json.loads((run_dir / "summary.json").read_text())
    step = summary["steps"]
    assert tlm_lines(err) == [f"tlm: interrupted at step {step} of 5000: checkpoint written to "
                              f"{run_dir / 'checkpoints' / f'step-{step:08d}'}; rerun the same command to resume"], err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert summary["stopped"] == "SIGINT" and verify(find_resume(run_dir, "auto")) is None
    status, _, err = cli([*args, f"--train.stop_at={step + 2}"], capsys)  # the same command resumes it
    assert status == 0, err
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == step + 2


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path: Path, prepared: Path) -> None:
    run_dir = tmp_path / "run"
    proc = child(train_args(prepared, run_dir, **{"train.max_steps": 5000, "checkpoint.every": 0}),
                 env={"TLM_FAULT": "stall_in_save@any"})  # the checkpoint write takes a minute
    wait_for_step(run_dir, proc, 2)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 60
    while time.time() < deadline and not list((run_dir / "checkpoints").glob("step-*")):
        time.sleep(0.05)
    time.sleep(0.3)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130 and time.time() - sent < 10
    err = proc.stderr.read()
    assert tlm_lines(err) == ["tlm: interrupted again: stopping now, without a new checkpoint; the last complete "
                              "checkpoint is intact (rerun the same command to resume from it)"], err
    assert "Traceback" not in err
    assert find_resume(run_dir, "auto") is None  # the stalled checkpoint never became visible


def test_ctrl_c_under_torchrun(tmp_path: Path, prepared: Path) -> None:
    """torchrun (as launch/torchrun.sh starts it) passes Ctrl-C on to its workers: both ranks finish the step,
    one checkpoint is written, rank 0 says so in one line, exit 130; no traceback from tlm or torchrun."""
    import subprocess

    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TLM_FAULT": ""}
    command = [sys.executable, "-m", "tlm.training.launch", "torchrun", "--standalone", "--nproc_per_node", "2", "-m", "tlm",
               *map(str, train_args(prepared, run_dir, **{"train.max_steps": 5000, "checkpoint.every": 0,
                                                          "batch.micro_batch_size": 2}))]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, proc, 3, timeout=180)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130
    err = proc.stderr.read()
    assert "Traceback" not in err, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == "SIGINT" and summary["world_size"] == 2, err[-3000:]
    assert verify(find_resume(run_dir, "auto")) is None
    lines = tlm_lines(err)
    assert lines == [f"tlm: interrupted at step {summary['steps']} of 5000: checkpoint written to {summary['checkpoint']}; "
                     "rerun the same command to resume"], err[-3000:]
    assert "KeyboardInterrupt" not in err and "gloo" not in err.lower(), err[-3000:]
    assert "backend ddp" in err  # two plain ranks are DDP, and the header says so


def test_ctrl_c_under_the_deepspeed_launcher(tmp_path: Path, prepared: Path) -> None:
    """A terminal's Ctrl-C reaches every process of the job (runner, launcher, ranks): one checkpoint, one line,
    exit 130 (launch/deepspeed.sh, ZeRO-2, 2 ranks)."""
    import subprocess

    run_dir = tmp_path / "run"
    env = {**os.environ, "PROCS_PER_NODE": "2", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TLM_FAULT": "",
           "TLM_PYTHON": sys.executable}
    args = train_args(prepared, run_dir, **{"train.max_steps": 5000, "checkpoint.every": 0, "train.backend": "deepspeed",
                                            "train.zero_stage": 2, "batch.micro_batch_size": 2})[1:]
    proc = subprocess.Popen([str(REPO / "launch" / "deepspeed.sh"), *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_step(run_dir, proc, 3, timeout=240)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(180) == 130
    err = proc.stderr.read()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == "SIGINT" and summary["world_size"] == 2 and verify(find_resume(run_dir, "auto")) is None
    assert tlm_lines(err) == [f"tlm: interrupted at step {summary['steps']} of 5000: checkpoint written to "
                              f"{summary['checkpoint']}; rerun the same command to resume"], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_a_full_disk_while_logging_tears_no_line_and_the_run_resumes(tmp_path: Path, prepared: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    args = train_args(prepared, run_dir, **{"train.max_steps": 6, "checkpoint.every": 2})
    status, _, err = cli([*args, "--train.stop_at=2"], capsys)
    assert status == 0, err
    metrics = run_dir / "metrics.jsonl"
    limit = 16 << 20  # above every checkpoint file, just above the metrics file
    with open(metrics, "a") as f:
        while metrics.stat().st_size < limit - 150:
            f.write(json.dumps({"step": 0, "note": "x" * min(4000, max(1, limit - 250 - metrics.stat().st_size))}) + "\n")
            f.flush()

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = child(args, preexec_fn=small_disk)
    assert full.wait(120) == 2
    err = full.stderr.read()
    assert tlm_lines(err) and len(tlm_lines(err)) == 1 and "Traceback" not in err, err[-2000:]
    assert f"cannot write {metrics}: File too large" in tlm_lines(err)[0] and "free there" in tlm_lines(err)[0]
    assert metrics.read_bytes().endswith(b"\n")  # no torn line
    read_metrics(metrics)
    with open(metrics, "r+") as f:  # space is back
        lines = f.read().splitlines(keepends=True)
        f.seek(0)
        f.truncate()
        f.writelines(line for line in lines if '"note"' not in line)
    status, _, err = cli(args, capsys)
    assert status == 0, err
    assert max(r["step"] for r in read_metrics(metrics)) == 6


def test_a_torn_metrics_line_is_cut_when_the_run_resumes(tmp_path: Path, prepared: Path, capsys: pytest.CaptureFixture,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    args = train_args(prepared, run_dir, **{"train.max_steps": 4})
    status, _, err = cli([*args, "--train.stop_at=2"], capsys)
    assert status == 0, err
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed in the middle of a line
    with caplog.at_level("WARNING"):
        status, _, err = cli(args, capsys)
    assert status == 0, err
    assert "cut a torn last line" in caplog.text
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_a_garbled_metrics_line_is_named_when_read_back(tmp_path: Path) -> None:
    from tlm_base.errors import TLMError

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 8.0}\n{"step": "two", "loss": 7.0}\n{"step": 3, "loss": 6.0}\n')
    with pytest.raises(TLMError, match=r"metrics.jsonl:2: key 'step': input should be a valid integer"):
        read_metrics(path)
    path.write_text('{"step": 1, "loss": 8.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 8.0}]  # a torn last line is left out, with a warning


def _immutable(paths: list[Path], on: bool) -> bool:
    """chattr +i / -i: root ignores permission bits, not the immutable flag. False where it is unsupported."""
    import subprocess

    if not paths:
        return True
    result = subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], capture_output=True)
    return result.returncode == 0


def test_a_read_only_run_folder_is_one_line(tmp_path: Path, prepared: Path, capsys: pytest.CaptureFixture) -> None:
    """Even a finished run: tlm must be able to write in its folder (its lock, the summary)."""
    run_dir = tmp_path / "run"
    args = train_args(prepared, run_dir, **{"train.max_steps": 2})
    status, _, err = cli(args, capsys)
    assert status == 0, err
    paths = [run_dir, *run_dir.rglob("*")]
    for path in paths:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    frozen = os.getuid() == 0 and shutil.which("chattr") is not None and _immutable(paths, True)
    if os.getuid() == 0 and not frozen:
        pytest.skip("running as root without chattr +i: nothing is read-only to root here")
    try:
        before = snapshot(run_dir)
        proc = child(args)
        assert proc.wait(120) == 2
        err = proc.stderr.read()
        lines = tlm_lines(err)
        assert len(lines) == 1 and lines[0].startswith(f"tlm: error: run folder '{run_dir}' is not writable ("), err[-2000:]
        assert lines[0].endswith("): tlm must write there; fix its permissions or choose another folder")
        assert "Traceback" not in err and snapshot(run_dir) == before
    finally:
        if frozen:
            _immutable(paths, False)
        for path in paths:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
