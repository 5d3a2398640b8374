"""Helpers of the hostile-input suite (tests/test_hostile_*.py): run the real CLI in this process or as a
child, and prove that a refused command changed nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tlm.cli import main

REPO = Path(__file__).resolve().parent.parent
DEBUG = REPO / "configs" / "debug.yaml"


def call_main(args: list[Any]) -> int:
    """`tlm ARGS` in this process; its exit status. The signal handlers are put back afterwards (`tlm train`
    ignores late stop signals once its checkpoint is written, as a process about to exit)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 0


def cli(args: list[Any], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run `tlm ARGS` here: (exit status, stdout, stderr)."""
    code = call_main(args)
    out, err = capsys.readouterr()
    return code, out, err


def refused(args: list[str], capsys: pytest.CaptureFixture, *needles: str, code: int = 2) -> str:
    """Run `tlm ARGS`, expect exit `code` and one `tlm: error:` line holding every needle; return that line."""
    status, _, err = cli(args, capsys)
    errors = [line for line in err.splitlines() if line.startswith("tlm: error:")]
    assert status == code, f"exit {status}, expected {code}:\n{err[-3000:]}"
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in: {errors[0]}"
    return errors[0]


def child(args: list[str], env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """`python -m tlm ARGS` as a child process (stdout and stderr piped, text)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TLM_FAULT": "", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "tlm", *[str(a) for a in args]], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (the lock file, always rewritten, left out)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def copy_dataset(prepared: Path, dst: Path) -> Path:
    shutil.copytree(prepared, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    """Rewrite a JSON file after `edit` changed its value in place (what `edit` returns is ignored)."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def train_args(prepared: Path, run_dir: Path, **overrides: Any) -> list[str]:
    """`tlm train` on the debug recipe, a prepared dataset and a run folder, quiet and offline."""
    values = {"data.prepared": prepared, "logging.run_dir": run_dir, "logging.sample_prompt": "null",
              "logging.wandb": "disabled", **overrides}
    return ["train", "--config", DEBUG, *[f"--{k}={v}" for k, v in values.items()]]


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding FOLDER/.lock (as a running tlm would), returned once it holds it."""
    code = ("import sys, time; from tlm_base.locks import FolderLock; FolderLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc
