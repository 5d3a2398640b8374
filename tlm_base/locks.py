"""One owner per folder: an advisory lock on FOLDER/.lock, taken by `tlm train` (the run folder), `tlm prepare`
(its output) and `tlm tokenizer` (its output).

The lock is `flock(2)` on an open file: the kernel drops it when its process ends in any way (exit, crash,
kill -9), so a lock left by a dead process never blocks a rerun and there is nothing to clean up. The file
holds the holder's host, pid, start time and command, for the message the next process prints. Taking a lock
this process already holds (the ablation runner claims a run, then trains it) only counts up.

A folder that is replaced as a whole (`tlm_base.folders.replace_folder`) is locked through a file beside it
(`FolderLock(folder, file=PARENT/.NAME.lock)`), which works before the folder exists and is not swapped away with
it; that file is removed when released, and a process that locked a file removed under it locks again.

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

from tlm_base.errors import TLMError
from tlm_base.fileio import check_output_folder

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


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class FolderLock:
    """`with FolderLock(folder, "run folder", wait=False): ...` or `.acquire()` / `.release()`."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder", wait: bool = False,
                 hint: str = "wait for it to finish, stop it, or choose another folder",
                 file: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder)
        self.what, self.wait, self.hint = what, wait, hint
        self.file = Path(file) if file is not None else None  # a lock file beside the folder, removed on release
        self.fd: int | None = None
        self.depth = 0

    @property
    def path(self) -> Path:
        return self.file if self.file is not None else self.folder / LOCK_NAME

    def acquire(self) -> "FolderLock":
        key = self.path.parent.resolve() / self.path.name
        outer = _held.get(key)
        if outer is not None:  # this process holds it already (e.g. the ablation runner, then the trainer)
            outer.depth += 1
            self._outer = outer
            return self
        self._outer = None
        check_output_folder(self.folder, self.what)  # a name too long, a file in the way, /proc: one line
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = self._open_locked()
        except PermissionError as e:
            raise TLMError(f"{self.what} '{self.folder}' is not writable ({e.strerror}): tlm must write there; "
                           "fix its permissions or choose another folder") from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise TLMError(f"{self.what} '{self.folder}' is on a read-only filesystem: tlm must write there; "
                               "choose another folder") from None
            raise
        self.fd, self.depth, self._key = fd, 1, key
        _held[key] = self
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(["tlm", *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return self

    def _open_locked(self) -> int:
        """The lock file, open and locked by this process."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                self._lock(fd)
                if self.file is None or _same_file(fd, self.path):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # its holder removed that file as it released it: lock the one there now

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
        _held.pop(self._key, None)
        try:
            if self.file is not None:
                self.file.unlink(missing_ok=True)  # still held: a process waiting on it sees it gone and locks afresh
            else:
                os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
