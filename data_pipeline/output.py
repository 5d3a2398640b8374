"""The folder a prepare writes: the dataset is made in OUT.partial beside OUT and swapped in whole; OUT may hold
only a dataset's own files, and neither it nor OUT.partial may lie inside the data it is made from, or hold it."""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path

from data_pipeline.journal import JOURNAL
from data_pipeline.prepare_config import PrepareConfig
from data_pipeline.shards import MANIFEST
from data_pipeline.sources import HF_PREFIX
from tlm_base.errors import DataError
from tlm_base.fileio import fsync_path

# What a dataset folder (OUT, or OUT.partial while it is made) may hold: anything else is not prepare's to replace.
_OWN_FILE = re.compile(r"^(\.lock|manifest\.json|\.prepare-journal\.jsonl|(train|val)-\d{5,}\.arrow|\..+\.tmp)$")


def partial_dir(out: Path) -> Path:
    """Where the dataset for OUT is made (and an interrupted prepare resumes) before it is swapped into OUT."""
    out = Path(out).absolute()
    return out.with_name(out.name + ".partial")


def replaced_dir(out: Path) -> Path:
    """Where OUT's previous folder goes at the swap, to be deleted."""
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.replaced")


def drop_if_empty(partial: Path) -> None:
    """After a failed or stopped prepare, remove OUT.partial when nothing was committed there (there is nothing to
    resume: a refusal before the first shard leaves the folders as they were)."""
    try:
        journal = partial / JOURNAL
        lines = journal.read_bytes().count(b"\n") if journal.exists() else 0
        if partial.is_dir() and lines <= 1 and not any(partial.glob("*.arrow")) and not (partial / MANIFEST).exists():
            shutil.rmtree(partial)
    except OSError:
        pass


def _local_path(item: str) -> Path | None:
    """The file or folder a --data item names on this machine (a glob: the folder its pattern starts in)."""
    text = item[len(HF_PREFIX):] if item.startswith(HF_PREFIX) else item
    path = Path(text).expanduser()
    if glob.has_magic(text):
        parts = []
        for part in path.parts:
            if glob.has_magic(part):
                break
            parts.append(part)
        path = Path(*parts) if parts else Path(".")
    return path if path.exists() else None


def refuse_data_near(config: PrepareConfig, out: Path) -> None:
    """--out must lie apart from the data: inside a data folder its shards and manifest would be read back as
    data; with the data inside it, replacing the folder at the end would delete the data."""
    places = [out.resolve(), partial_dir(out).resolve(), replaced_dir(out).resolve()]
    for flag, items in (("--data", config.data), ("--val_data", config.val_data or [])):
        for item in items:
            path = _local_path(str(item))
            if path is None:
                continue
            data = path.resolve()
            for place in places:
                if place == data:
                    raise DataError(f"--out '{out}' is the data folder itself ({flag} '{item}'): prepare would read its own "
                                    "output as data and replace the folder; choose an --out outside it")
                if data in place.parents:
                    raise DataError(f"--out '{out}' lies inside the data folder '{item}' ({flag}): its shards and "
                                    "manifest.json would be read back as data (and --overwrite would replace them); choose "
                                    f"an --out outside '{item}'")
                if place in data.parents:
                    raise DataError(f"{flag} '{item}' lies inside --out '{out}': prepare replaces that folder when it "
                                    "finishes, which would delete the data; move the data out or choose another --out")


def refuse_foreign_files(out: Path) -> None:
    """OUT is replaced as a whole when the dataset is ready: it may hold nothing but a dataset's files, and may
    not be (or hold) the current folder or the home folder."""
    resolved = out.resolve()
    for place in (Path.cwd().resolve(), Path(os.path.expanduser("~")).resolve()):
        if resolved == Path(resolved.anchor) or resolved == place or resolved in place.parents:
            raise DataError(f"--out '{out}' is or holds {place} (the current folder or the home folder): prepare "
                            "replaces that folder when the dataset is ready; choose a folder of its own")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _OWN_FILE.match(p.name) or p.is_dir())
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(f"--out '{out}' holds files that are not a tlm dataset's ({shown}); prepare replaces the whole "
                        "folder when the new dataset is ready, so --out must be a new or empty folder or a prepared "
                        "dataset: choose another --out")


def swap_in(partial: Path, out: Path) -> None:
    """Make the whole dataset in `partial` the folder `out` (under prepare's lock): one atomic exchange of the two
    folders where the filesystem allows it, else two renames (`out` is then missing for an instant, never half
    made). The previous folder is deleted; a reader that has its files open keeps reading them."""
    from tlm_base.folders import exchange

    (partial / JOURNAL).unlink(missing_ok=True)
    replaced = replaced_dir(out)
    shutil.rmtree(replaced, ignore_errors=True)
    if not os.path.lexists(out):
        os.rename(partial, out)
    elif exchange(partial, out):
        os.rename(partial, replaced)  # the old folder, now under the partial name
    else:
        os.rename(out, replaced)
        os.rename(partial, out)
    fsync_path(out.absolute().parent)
    shutil.rmtree(replaced, ignore_errors=True)
