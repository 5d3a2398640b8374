"""Folders made whole or not at all: built in a temporary folder beside the target and swapped in under a lock
(`replace_folder`), used by exports, model folders, DeepSpeed's universal conversion and, through `exchange`,
prepared datasets."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tlm_base.errors import TLMError
from tlm_base.fileio import DiskFullError, disk_full, fsync_path, fsync_tree, is_disk_full
from tlm_base.locks import FolderLock

log = logging.getLogger("tlm")


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # an old kernel, or a filesystem without it (NFS)
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@contextlib.contextmanager
def replace_folder(target: str | os.PathLike, what: str = "folder",
                   hint: str = "wait for it to finish, or choose another folder") -> Iterator[Path]:
    """Build a folder whole in a temporary folder beside `target`, then swap it in for `target`:

        with replace_folder(out, "export folder") as tmp:
            ...           # `out` is locked now: check what it holds, then write the new files into `tmp`
        # `out` is exactly what was written into `tmp`; nothing of the old `out` is left

    - Lock: PARENT/.NAME.lock (a FolderLock on a file beside the target: it works before the target exists and is
      not swapped away with it; removed on release). A second writer is refused naming the holder
      (`FolderInUse`: "WHAT 'TARGET' is in use by pid ...; HINT"); so is a target whose own .lock (a run, a
      prepared dataset, a tokenizer) is held.
    - Build: in PARENT/.NAME.tmp-PID. An error in the block (a refusal, a full disk: a DiskFullError naming
      `target`) removes it; `target` is untouched.
    - Swap: the new folder is fsynced, then exchanged with the old one in one step (renameat2 RENAME_EXCHANGE),
      or, where the filesystem cannot, the old one is renamed to PARENT/.NAME.old-PID and the new one in; then
      the old one is deleted. A missing target is simply renamed into place.
    - A kill at any moment leaves at `target` the old folder whole or the new one whole (in the fallback, for the
      instant between its two renames, the old one whole as .NAME.old-PID), plus at worst hidden leftovers
      `.NAME.tmp-*` / `.NAME.old-*`. Nothing reads those; the next call on the same target, once it holds the
      lock (so that no live writer owns them), renames a lone .old- back into place and deletes the rest.
    """
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()  # replace the folder it points to; the link keeps pointing at the new one
    _refuse_to_replace_home(target, what)
    parent, name = target.absolute().parent, target.name
    with contextlib.ExitStack() as held:
        held.enter_context(FolderLock(target, what, hint=hint, file=parent / f".{name}.lock"))
        for leftover in sorted(parent.iterdir()):
            if leftover.name.startswith(f".{name}.old-") and not os.path.lexists(target):
                os.rename(leftover, target)  # killed between the fallback's two renames: the old one goes back
                log.warning("%s: restored from %s, left by an interrupted replacement", target, leftover.name)
            elif leftover.name.startswith((f".{name}.tmp-", f".{name}.old-")):
                log.info("removing %s, left by an interrupted write", leftover)
                _remove(leftover)
        if (target / ".lock").is_file():
            held.enter_context(FolderLock(target, what, hint=hint))  # a run, a dataset or a tokenizer in use
        tmp, old = parent / f".{name}.tmp-{os.getpid()}", parent / f".{name}.old-{os.getpid()}"
        tmp.mkdir()
        try:
            yield tmp
            fsync_tree(tmp)
            if not os.path.lexists(target):
                os.rename(tmp, target)
            elif exchange(tmp, target):
                old = tmp  # the old folder is now under the temporary name
            else:
                os.rename(target, old)
                os.rename(tmp, target)
            fsync_path(parent)
        except BaseException as e:
            if not os.path.lexists(target) and os.path.lexists(old):
                os.rename(old, target)
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e) and not isinstance(e, DiskFullError):
                raise disk_full(e, target) from e
            raise
        with contextlib.suppress(OSError):  # the new folder is in place; a failure here only leaves a leftover
            _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _refuse_to_replace_home(target: Path, what: str) -> None:
    """Never swap away the root, the current folder, the home folder, or a folder holding either."""
    resolved = target.resolve()
    for inside in (Path.cwd(), Path(os.path.expanduser("~"))):
        inside = inside.resolve()
        if resolved == Path(resolved.anchor) or resolved == inside or resolved in inside.parents:
            raise TLMError(f"will not replace {what} '{target}': it is or holds {inside} (the current folder or the "
                           "home folder); choose another folder")
