"""Crash-safe file writing shared by model directories, exports, token shards, journals and metrics.

Whole files are written beside their final name, fsynced and renamed over it, so a reader sees the old
file or the new one, never half of one; they get the permissions every other tool's output gets (0666
less the umask: 0644 under the usual 022), not the 0600 of a private temporary file.

Append-only logs (the prepare journal, metrics.jsonl) are written a whole line per call; a write that
fails part way (a full disk) is rolled back to the previous line end, and a torn last line left by a kill
is cut when the file is next opened for appending, with a warning. A full disk is reported as one
`DiskFullError` naming the file and the free space left.

Whole folders are made in tlm_base.folders (on top of this and the locks); here are the checks of a folder that
output goes to (`check_output_folder`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from tlm_base.errors import TLMError

log = logging.getLogger("tlm")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_umask_lock = threading.Lock()


class DiskFullError(TLMError, OSError):
    """No space (or quota, or file-size limit) left for a write; the message names the file and the free space."""

    path: Path | None = None
    free: int | None = None
    what: str = ""

    def __str__(self) -> str:
        return self.strerror if self.strerror else super().__str__()


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no read-only call)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def disk_full(error: OSError, path: Path | str, then: str = "free some space and rerun the same command") -> DiskFullError:
    """A one-line DiskFullError for `error` raised while writing `path` (its `.path`, `.free` and `.what` are kept
    for callers that say more)."""
    what = os.strerror(error.errno) if error.errno else str(error)
    free = free_bytes(Path(path))
    result = DiskFullError(error.errno, f"cannot write {path}: {what} ({human_bytes(free)} free there); {then}")
    result.path, result.free, result.what = Path(path), free, what
    return result


def fsync_path(path: Path) -> None:
    """Flush a written file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def honour_umask(path: Path) -> None:
    """Give a file the permissions a plain open() would have (some writers, e.g. safetensors, make 0600)."""
    os.chmod(path, 0o666 & ~current_umask())


def temp_path_beside(path: Path) -> Path:
    """A new empty file beside `path` (`.NAME.*.tmp`) with the umask's permissions, for a write-then-rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: teammates could not read the result
    finally:
        os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = temp_path_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise disk_full(e, path) from e
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def unknown_entries(folder: Path, known: tuple[str, ...]) -> list[str]:
    """The names in `folder` that are neither in `known` nor tlm's own, sorted: tlm's own are the lock of
    `tlm train` / `prepare` / `tokenizer` (.lock) and the `.NAME.*.tmp` of an interrupted write-then-rename."""
    return sorted(p.name for p in folder.iterdir() if p.name not in known and p.name != ".lock"
                  and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (and itself)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cut_torn_tail(path: Path) -> int:
    """Cut a last line that has no newline (a write interrupted by a kill or a full disk); return the bytes cut."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Find the last newline, reading backwards in blocks.
        end, keep = size, 0
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            block = f.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s: cut a torn last line (%d bytes) left by an interrupted write", path, size - keep)
    return size - keep


class LineAppender:
    """Appends whole lines to a file; a failed write leaves the file as it was before the call."""

    def __init__(self, path: Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(self.path) and not os.path.isfile(self.path):  # a FIFO would block the first write
            raise TLMError(f"{self.path} is not a regular file (it is {file_kind(self.path)}): tlm appends whole lines "
                           "to it; remove it and rerun")
        cut_torn_tail(self.path)
        try:
            self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(e, self.path) from e
            raise

    def write_line(self, text: str) -> None:
        if self.fd is None:
            raise ValueError(f"{self.path} is closed")
        data = (text.rstrip("\n") + "\n").encode("utf-8")
        size = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            if self.fsync:
                os.fsync(self.fd)
        except OSError as e:
            try:
                os.ftruncate(self.fd, size)  # no torn line: back to the last complete one
            except OSError:
                pass
            if is_disk_full(e):
                raise disk_full(e, self.path) from e
            raise

    def write_json(self, record: Any) -> None:
        self.write_line(json.dumps(record))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


VIRTUAL_FILESYSTEMS = {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "pstore", "bpf",
                       "configfs", "devpts", "mqueue", "fusectl", "efivarfs", "binfmt_misc"}
"""The kernel's file systems: no folder of tlm's can live there."""


def file_kind(path: Path) -> str:
    """What a path is, for a message: a regular file, a FIFO, a character device, ..., a folder."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return "a symbolic link to nothing" if os.path.islink(path) else f"unreadable: {e.strerror}"
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def filesystem_of(path: Path) -> tuple[str, str] | None:
    """(mount point, filesystem type) of an existing path, from /proc/self/mountinfo; None where there is none."""
    import re

    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    real, best = os.path.realpath(path), None
    for line in lines:
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best[0])):
            best = (mount, fields[fields.index("-", 6) + 1])
    return best


def check_output_folder(folder: str | os.PathLike, what: str = "folder", flag: str = "folder") -> None:
    """Refuse, before anything is written, a folder tlm could not create or keep files in: a name too long, a file
    or a device in its place or above it, a kernel file system such as /proc. One TLMError line naming the path
    and why, and `flag` (how to choose another)."""
    shown = f"{what} '{folder}'"
    path = Path(os.path.abspath(folder))
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in path.parts[1:]:
        if len(os.fsencode(part)) > name_max:
            raise TLMError(f"{shown}: name too long ({len(os.fsencode(part))} > {name_max} bytes: '{part[:24]}...'); "
                           f"choose a shorter {flag}")
    if len(os.fsencode(str(path))) >= path_max:
        raise TLMError(f"{shown}: path too long ({len(os.fsencode(str(path)))} >= {path_max} bytes); choose a "
                       f"shorter {flag}")
    if existing == path and not path.is_dir():
        raise TLMError(f"{shown} is not a directory (it is {file_kind(path)}); give {flag} a folder")
    if existing != path and not existing.is_dir():
        raise TLMError(f"{shown} cannot be created: '{existing}' is not a directory (it is {file_kind(existing)})")
    mount = filesystem_of(existing)
    if mount is not None and mount[1] in VIRTUAL_FILESYSTEMS:
        raise TLMError(f"{shown} is on {mount[0]}, a {mount[1]} file system (the kernel's, not one for files); "
                       f"choose another {flag}")
