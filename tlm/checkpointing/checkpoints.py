"""The Checkpointer: saves a run's parts into RUN/checkpoints/step-N/ (the layout: tlm.checkpointing.layout) and
restores them; every rank's RNG; the COMPLETE manifest written last, then `latest` (what a rerun continues,
tlm.checkpointing.lineage, which also prunes).

A checkpoint without COMPLETE (killed while saving) is never loaded, nor one whose files no longer match
its manifest (truncated, tampered, lost): `--resume auto` takes the first sound one down the line `latest`
names and says which it passed over and why.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from tlm_base.errors import CheckpointError
from tlm_base.fileio import atomic_write_bytes, atomic_write_json, fsync_path, sha256_file
from tlm.checkpointing.layout import COMPLETE, TRAINER, checkpoint_dir, is_complete
from tlm.checkpointing.lineage import find_resume, move_aside, new_id, prune

log = logging.getLogger("tlm")
def rng_state() -> dict[str, Any]:
    """Every RNG a rank uses, as tensors and plain lists (loadable with torch.load(weights_only=True))."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_rng(path: Path, rank: int) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    atomic_write_bytes(path / "rng" / f"rank-{rank}.pt", buffer.getvalue())


def load_rng(path: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False when the checkpoint has none for this rank (new world size)."""
    file = path / "rng" / f"rank-{rank}.pt"
    if not file.is_file():
        return False
    state = torch.load(file, weights_only=True)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def write_trainer_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_json(path / TRAINER, state)


def manifest(path: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file of a checkpoint, each fsynced on the way."""
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != COMPLETE):
        fsync_path(file)
        files[file.relative_to(path).as_posix()] = [file.stat().st_size, sha256_file(file)]
    for folder in sorted({f.parent for f in path.rglob("*")} | {path}):
        fsync_path(folder)  # the directory entries too, so that a crash cannot lose a renamed file
    return files


def mark_complete(run_dir: Path, path: Path) -> None:
    """The manifest as COMPLETE, then the `latest` pointer: the order that makes a checkpoint visible only
    when whole (and checkable later)."""
    atomic_write_json(path / COMPLETE, {"files": manifest(path)})
    atomic_write_bytes(run_dir / "checkpoints" / "latest", (path.name + "\n").encode())


def clear_the_way(path: Path) -> None:
    """Make room for a new checkpoint at `path`: a leftover of a kill while saving this very step is deleted;
    a complete checkpoint there (another line's, or one copied in) is moved aside whole, never deleted."""
    if not path.exists():
        return
    if is_complete(path):
        target = move_aside([path], path.parent)
        log.warning("%s was in the way of this run's new checkpoint: moved to %s", path, target)
    else:
        shutil.rmtree(path)


class Stateful(Protocol):
    """A part of a run that a checkpoint saves and restores (the data stream, the trainer's counters, ...)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BackendFiles(Protocol):
    """What a training backend offers a checkpoint: its own files, and the full fp32 state for the model folder."""

    def save(self, path: Path) -> None: ...

    def load(self, path: Path, saved_world_size: int) -> None: ...

    def full_state_dict(self, path: Path) -> dict[str, Any]: ...


class Checkpointer:
    """Saves a run's parts into RUN/checkpoints/step-N/ and restores them: the backend's files (every rank), every
    rank's RNG, the stateful parts and the run's description in trainer.json, and the consolidated model folder
    (rank 0). COMPLETE is written last, after a barrier, then `latest`; old checkpoints are pruned.

    A write that fails (a full disk, a quota, an I/O error) removes what it wrote and raises a CheckpointError
    that names the failure; the previous checkpoint is untouched.
    """

    def __init__(self, run_dir: Path, rank: int, world_size: int, backend: BackendFiles, parts: dict[str, Stateful],
                 describe: Callable[[], dict[str, Any]], write_model: Callable[[dict[str, Any], Path, int], None],
                 keep_last: int, barrier: Callable[[], None], hook: Callable[[int], None] | None = None,
                 lineage: dict[str, Any] | None = None, rerun: str = "rerun the same command to resume") -> None:
        self.run_dir, self.rank, self.world_size = run_dir, rank, world_size
        self.backend, self.parts, self.describe, self.write_model = backend, parts, describe, write_model
        self.keep_last, self.barrier, self.hook, self.rerun = keep_last, barrier, hook, rerun
        self.lineage = lineage or {"run_id": new_id(), "parent": None, "parent_name": None}
        """The next checkpoint's lineage (rank 0): this run's id and the checkpoint the session continues."""

    def save(self, step: int) -> Path:
        path = checkpoint_dir(self.run_dir, step)
        main = self.rank == 0
        try:
            if main:
                clear_the_way(path)
                (path / "backend").mkdir(parents=True)
            lineage = {**self.lineage, "id": new_id()}
            self.barrier()
            self.backend.save(path / "backend")
            save_rng(path, self.rank)
            state = self.backend.full_state_dict(path / "backend")
            if self.hook is not None:
                self.hook(step)  # fault injection: between the backend's files and COMPLETE
            if main:
                self.write_model(state, path / "model", step)
                parts = {}
                for name, part in self.parts.items():  # the part named "" sits at the top level
                    parts.update(part.state_dict() if name == "" else {name: part.state_dict()})
                write_trainer_state(path, {**self.describe(), "world_size": self.world_size, "lineage": lineage,
                                           **parts})
            self.barrier()
            if main:
                mark_complete(self.run_dir, path)
        except OSError as e:
            raise self._failed(e, step, path) from e
        self.lineage = {"run_id": lineage["run_id"], "parent": lineage["id"], "parent_name": path.name}
        if main:
            prune(self.run_dir, self.keep_last, path)
        self.barrier()
        return path

    def _failed(self, error: OSError, step: int, path: Path) -> CheckpointError:
        from tlm_base.fileio import DiskFullError, free_bytes, human_bytes

        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # free the space a full disk needs back
        previous = find_resume(self.run_dir, "auto") if self.rank == 0 else None
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no previous checkpoint"
        if isinstance(error, DiskFullError):
            what = f"{error.what} writing {error.path} ({human_bytes(free_bytes(path))} free there)"
            then = f"; free some space and {self.rerun} from it"
        else:
            what, then = f"{error.strerror or error} ({type(error).__name__}, errno {error.errno})", ""
        return CheckpointError(f"could not write the checkpoint of step {step} in {path}: {what}; {kept}{then}")

    def restore(self, path: Path, state: dict[str, Any]) -> bool:
        """Load the backend's files and every part from checkpoint `path` (its trainer.json is `state`); returns
        whether this rank's RNG states were there (not after a change of world size)."""
        self.backend.resume(path / "backend", state["world_size"])
        for name, part in self.parts.items():
            part.load_state_dict(state if name == "" else state[name])
        return load_rng(path, self.rank)
