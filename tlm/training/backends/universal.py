"""DeepSpeed's universal checkpoint: a ZeRO 1-3 checkpoint converted once, on rank 0, so that it loads on another
number of ranks; made whole or not at all, its converter never outliving tlm."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tlm.training.backends.zero import DS_TAG
from tlm_base.errors import CheckpointError
from tlm_base.fileio import atomic_write_bytes, atomic_write_json
from tlm_base.folders import replace_folder

log = logging.getLogger("tlm")


UNIVERSAL_CONVERTER = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
CONVERTED = "CONVERTED"  # written into the universal folder once the converter has exited 0


def convert_to_universal(path: Path) -> None:
    """DeepSpeed's universal checkpoint of `path/deepspeed`, for loading on another world size (rank 0).

    The converter writes into a temporary folder beside `path/deepspeed_universal`, which is swapped in with a
    CONVERTED marker only when it exited 0 (`replace_folder`); a conversion folder without the marker (one made
    by an older tlm, or by hand) is redone, and a leftover temporary one is deleted. The converter and its pool
    of workers run in their own session, killed as a group when tlm is interrupted or dies (`run_as_group`)."""
    target = path / f"{DS_TAG}_universal"
    if (target / CONVERTED).is_file():
        return
    log.info("converting %s to a universal checkpoint for a new world size", path)
    with replace_folder(target, "universal checkpoint folder") as tmp:
        command = [*UNIVERSAL_CONVERTER, "--input_folder", str(path / DS_TAG), "--output_folder", str(tmp),
                   "--inject_missing_state"]
        code, output = run_as_group(command)
        if code != 0:  # its output kept beside the checkpoint; the error is one line
            report = path / "ds_to_universal.log"
            atomic_write_bytes(report, output.encode("utf-8", "replace"))
            last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
            raise CheckpointError(f"DeepSpeed's ds_to_universal could not convert {path} for a new world size (exit "
                                  f"status {code}: {last.strip()[:200]}); its output is in {report}; resume on the "
                                  "checkpoint's own number of ranks, or from another checkpoint")
        atomic_write_json(tmp / CONVERTED, {"converted_from": DS_TAG, "exit_status": code})
    if (path / "latest_universal").is_file():  # the converter names its output folder there: the temporary name
        atomic_write_bytes(path / "latest_universal", target.name.encode())


# The parent of a command run by run_as_group: the leader of the command's session, which kills the whole
# session (the command and every process it started) when tlm is gone -- even by SIGKILL, which no handler in
# tlm can catch: it notices within 0.2 s that its parent has changed.
_WATCHDOG = """
import os, signal, subprocess, sys, time
tlm, child = int(sys.argv[1]), subprocess.Popen(sys.argv[2:])
while child.poll() is None:
    if os.getppid() != tlm:
        os.killpg(0, signal.SIGKILL)
    time.sleep(0.2)
sys.exit(child.returncode)
"""


def run_as_group(command: list[str]) -> tuple[int, str]:
    """Run `command` in its own session and return (exit status, its stdout and stderr). No process of it outlives
    this call: whatever is left of the session when the command exits, or when tlm is interrupted (Ctrl-C, an
    exception) or killed, is SIGKILLed as a group."""
    with tempfile.TemporaryFile() as output:  # not a pipe: a stray worker holding it open cannot hang the read
        proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *command], stdout=output,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait()
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        output.seek(0)
        return code, output.read().decode("utf-8", "replace")
