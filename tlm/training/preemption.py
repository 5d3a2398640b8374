"""Stopping cleanly on request: SIGUSR1 / SIGTERM (Slurm preemption, time limits), SIGHUP (the terminal or
ssh session closed), Ctrl-C, or a stop file.

Ctrl-C (SIGINT) is a stop too: the first one finishes the step, writes a checkpoint and the run exits with
status 130; a second one exits at once (130), without a new checkpoint, the last complete one intact.

Every rank installs the handlers; after each optimizer step the ranks agree (an all-reduce of one flag,
on a gloo group so that no GPU stream is synchronised) whether any of them was asked to stop, so they all
checkpoint at the same step. A stop file (the path in $TLM_STOP_FILE) serves launchers that do not pass
signals on to their workers (torchrun, the deepspeed launcher): the job script creates it.

From the request on, a grace period runs (train.stop_grace_s): a rank still alive when it ends logs why and
exits with status 143 (as SIGTERM would), so that a hung collective or a slow disk cannot carry the job
into the scheduler's SIGKILL unannounced. A checkpoint cut short by that exit has no COMPLETE marker and
is never loaded; the previous one is intact.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("tlm")
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # SIGHUP: the terminal closed
INTERRUPTED = "SIGINT"


def _say(line: str) -> None:
    """One line to stderr from a signal handler (rank 0 only under a launcher: every rank gets the signal)."""
    if os.environ.get("RANK", "0") == "0":
        try:
            os.write(2, (line + "\n").encode())
        except OSError:
            pass


class StopRequest:
    """Catches stop signals while installed (`install()` ... `uninstall()`, or as a context manager)."""

    def __init__(self, grace_s: float | None = None, rerun: str = "rerun the same command to resume") -> None:
        self.rerun = rerun
        self.reason: str | None = None
        self.interrupts = 0
        self.grace_s = grace_s
        self._timer: threading.Timer | None = None
        self._previous: dict[int, object] = {}
        self._group = None
        stop_file = os.environ.get("TLM_STOP_FILE")
        self.stop_file = Path(stop_file) if stop_file else None

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        if dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        return self

    @property
    def group(self) -> Any:
        """The process group of the stop check (gloo: it runs on the CPU), None in one process."""
        return self._group

    def uninstall(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                _say("tlm: interrupted again: stopping now, without a new checkpoint; the last complete checkpoint "
                     f"is intact ({self.rerun} from it)")
                os._exit(130)
        if self.reason is None:
            self._request(name)
            if signum != signal.SIGINT:  # Ctrl-C gets its one line when the checkpoint is written
                log.warning("%s received: finishing this step, then checkpointing and stopping", self.reason)

    def _request(self, reason: str) -> None:
        self.reason = reason
        if self.grace_s and self._timer is None:
            self._timer = threading.Timer(self.grace_s, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        log.error("still running %.0f s after the stop request (%s): exiting now without a new checkpoint; the "
                  "previous complete checkpoint is intact (train.stop_grace_s)", self.grace_s, self.reason)
        for handler in logging.getLogger("tlm").handlers + logging.getLogger().handlers:
            handler.flush()
        os._exit(130 if self.reason == INTERRUPTED else 143)

    def agreed(self) -> str | None:
        """The reason to stop if any rank was asked to (a collective: every rank calls it every step)."""
        if self.reason is None and self.stop_file is not None and self.stop_file.exists():
            self._request(f"stop file {self.stop_file}")
        if self._group is None:
            return self.reason
        flag = torch.tensor([1 if self.reason else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.reason is None:
            self._request("another rank was asked to stop")
        return self.reason
