"""Training checkpoints: layout, completeness, the `latest` pointer, resume lookup and pruning.

    RUN/checkpoints/step-00000100/
        backend/            the backend's own checkpoint (DeepSpeed folder, FSDP2 DCP, or state.pt)
        rng/rank-R.pt       every rank's RNG states (tensors and lists: weights_only loading)
        trainer.json        step, samples consumed, data stream state, world size, backend, full config, and
                            the lineage: the run's id, this checkpoint's id and the one it continued from
        model/              the consolidated model directory (tlm_config.json + model.safetensors + tokenizer)
        COMPLETE            written last, after every rank has finished writing: the manifest (size and
                            sha256 of every file, each fsynced while it is hashed)
    RUN/checkpoints/latest  the name of the checkpoint a plain rerun continues (moved after COMPLETE)
    RUN/checkpoints/abandoned/K/   checkpoints a rollback left behind (tlm.checkpointing.lineage)

A checkpoint without COMPLETE (killed while saving) is never loaded, nor one whose files no longer match
its manifest (truncated, tampered, lost): `--resume auto` takes the first sound one down the line `latest`
names and says which it passed over and why.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Protocol

import numpy as np
import torch

from data_pipeline.errors import CheckpointError
from data_pipeline.fileio import atomic_write_bytes, atomic_write_json, fsync_path, sha256_file
from data_pipeline.schema import (
    Field, NonNegInt, PosInt, RelativeFile, Schema, Sha256, StrictBool, StrictInt, StrictStr, load_json_text, parse,
)
from tlm.checkpointing.lineage import STEP_NAME, move_aside, new_id, prune

log = logging.getLogger("tlm")
COMPLETE = "COMPLETE"
TRAINER = "trainer.json"


class StreamState(Schema):
    consumed_samples: NonNegInt
    seed: StrictInt
    shuffle: StrictBool
    num_rows: PosInt
    dataset_fingerprint: StrictStr


class DataIdentity(Schema):
    """What the data of a run was: the prepared dataset and the tokenizer, by content."""

    fingerprint: StrictStr
    tokenizer_sha256: Sha256 | None = None
    prepared: StrictStr | list[StrictStr] | None = None  # a folder, or a mixture's folders


class ValidationFigures(Schema):
    """The figures of a validation pass (tlm.training.evaluate), as trainer.json and metrics.jsonl hold them."""

    val_loss: float | None = None
    val_ppl: float | None = None
    val_tokens: NonNegInt | None = None
    val_loss_se: float | None = None
    val_bpb: float | None = None
    val_bytes: NonNegInt | None = None


class Lineage(Schema):
    """trainer.json's `lineage`: see tlm.checkpointing.lineage."""

    run_id: StrictStr
    id: StrictStr
    parent: StrictStr | None = None
    parent_name: StrictStr | None = None


class TrainerState(ValidationFigures):
    """trainer.json: where a run stands, and the resolved configuration it stands on."""

    step: NonNegInt
    world_size: PosInt
    backend: Literal["single", "ddp", "deepspeed", "fsdp2"]
    zero_stage: Annotated[StrictInt, Field(ge=0, le=3)]
    stream: StreamState
    config: dict[str, Any]
    model: dict[str, Any] | None = None
    """The resolved ModelConfig the weights were trained with."""
    data: DataIdentity | None = None
    config_changes: list[dict[str, Any]] = []
    lineage: Lineage | None = None
    """The run this checkpoint belongs to and the one it continued from (tlm.checkpointing.lineage); None in
    checkpoints of an older tlm."""
    tokens_seen: NonNegInt = 0
    total_steps: PosInt | None = None
    skipped_steps: NonNegInt = 0


class CompleteManifest(Schema):
    """COMPLETE: every file of the checkpoint with its size and sha256."""

    files: dict[RelativeFile, Annotated[tuple[NonNegInt, Sha256], Field(strict=False)]]  # a JSON list


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / TRAINER).is_file()


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


def verify(path: Path, hashes: bool = True) -> str | None:
    """Why the checkpoint at `path` must not be loaded, or None when it is sound."""
    if not is_complete(path):
        return f"incomplete (no {COMPLETE} marker: interrupted while saving)"
    try:
        text = (path / COMPLETE).read_text()
        files = parse(CompleteManifest, json.loads(text), COMPLETE, CheckpointError).files if text.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError, CheckpointError) as e:
        return f"its {COMPLETE} manifest is unreadable ({str(e)[:160]})"
    if files is None:  # written by an older tlm, before manifests: nothing to check against
        return None
    for name, (size, digest) in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, its manifest says {size}"
        if hashes and sha256_file(file) != digest:
            return f"{name} does not match its sha256 in the manifest (corrupted or modified)"
    return None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """trainer.json of a complete checkpoint, validated (TrainerState)."""
    if not is_complete(path):
        raise CheckpointError(f"checkpoint '{path}' is incomplete (no {COMPLETE} marker): it was interrupted while saving")
    fix = ("resume from another checkpoint (--checkpoint.resume=PATH) or start afresh (--checkpoint.resume=none "
           "--checkpoint.overwrite=true, which deletes this run's checkpoints)")
    data = load_json_text(path / TRAINER, CheckpointError, fix)
    parse(TrainerState, data, str(path / TRAINER), CheckpointError, fix)
    return data


def read_latest(run_dir: Path) -> Path | None:
    """The checkpoint folder `RUN/checkpoints/latest` names (a plain step-N name, nothing else), if any."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer}: names {name[:40]!r}, not a checkpoint of this run (step-NNNNNNNN)")
    return run_dir / "checkpoints" / name


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a run in `run_dir` would resume for --checkpoint.resume=`resume`, changing nothing: None
    for 'none' or a fresh run; for 'auto' the first sound checkpoint down the line `latest` names
    (tlm.checkpointing.lineage). Incomplete checkpoints (a kill while saving) are passed over with a warning,
    and so are corrupt ones; but when every checkpoint of the line is corrupt the run stops with an error rather
    than start afresh over hours of training."""
    from tlm.checkpointing.lineage import plan_start

    return plan_start(run_dir, resume, overwrite=True).resume


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
        from data_pipeline.fileio import DiskFullError, free_bytes, human_bytes

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
        self.backend.load(path / "backend", state["world_size"])
        for name, part in self.parts.items():
            part.load_state_dict(state if name == "" else state[name])
        return load_rng(path, self.rank)
