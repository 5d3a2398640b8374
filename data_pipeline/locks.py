"""One owner per folder: an advisory lock on FOLDER/.lock, taken by `tlm train` (the run folder), `tlm prepare`
(its output) and `tlm tokenizer` (its output).

The lock is `flock(2)` on an open file: the kernel drops it when its process ends in any way (exit, crash,
kill -9), so a lock left by a dead process never blocks a rerun and there is nothing to clean up. The file
holds the holder's host, pid, start time and command, for the message the next process prints. Taking a lock
this process already holds (the ablation runner claims a run, then trains it) only counts up.

Shared filesystems: on NFS, Linux turns flock into a POSIX lock the server arbitrates, so it holds across
nodes (a crashed node's lock is freed when its lease expires, about 90 s on NFSv4). On Lustre it holds across
nodes when clients mount with `-o flock`; with `-o localflock` only within one node; without either, locking
fails with ENOSYS and tlm warns that the folder is not protected, and goes on. See docs/reliability.md.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from data_pipeline.errors import TLMError

log = logging.getLogger("tlm")
LOCK_NAME = ".lock"
_held: dict[Path, "FolderLock"] = {}  # resolved folder -> the lock this process holds on it


class FolderInUse(TLMError):
    """Another live process holds the folder; the message names it."""


def describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(info["started"])))
        return f"pid {int(info['pid'])} on {info['host']}, started {started}: {info.get('command', '?')}"
    except (ValueError, KeyError, TypeError):
        return "a process that is still starting (no holder details yet)"


class FolderLock:
    """`with FolderLock(folder, "run folder", wait=False): ...` or `.acquire()` / `.release()`."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder", wait: bool = False,
                 hint: str = "wait for it to finish, stop it, or choose another folder") -> None:
        self.folder = Path(folder)
        self.what, self.wait, self.hint = what, wait, hint
        self.fd: int | None = None
        self.depth = 0

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> "FolderLock":
        key = self.folder.resolve()
        outer = _held.get(key)
        if outer is not None:  # this process holds it already (e.g. the ablation runner, then the trainer)
            outer.depth += 1
            self._outer = outer
            return self
        self._outer = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError as e:
            raise TLMError(f"{self.what} '{self.folder}' is not writable ({e.strerror}): tlm must write there; "
                           "fix its permissions or choose another folder") from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise TLMError(f"{self.what} '{self.folder}' is on a read-only filesystem: tlm must write there; "
                               "choose another folder") from None
            raise
        try:
            self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.depth = fd, 1
        _held[key] = self
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(["tlm", *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return self

    def _lock(self, fd: int) -> None:
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                holder = describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
                if not self.wait:
                    raise FolderInUse(f"{self.what} '{self.folder}' is in use by {holder}; {self.hint}") from None
                if not announced:
                    log.info("%s '%s' is in use by %s; waiting for it", self.what, self.folder, holder)
                    announced = True
                time.sleep(0.5)
            except OSError as e:
                if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                    log.warning("%s '%s': this filesystem does not support file locks (%s); it is not protected "
                                "against a second process (on Lustre, mount with -o flock)", self.what, self.folder,
                                e.strerror)
                    return
                raise

    def release(self) -> None:
        if self._outer is not None:
            self._outer.depth -= 1
            self._outer = None
            return
        if self.fd is None:
            return
        self.depth -= 1
        if self.depth > 0:
            return
        _held.pop(self.folder.resolve(), None)
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
