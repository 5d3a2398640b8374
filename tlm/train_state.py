"""Training checkpoints: layout, completeness, the `latest` pointer, resume lookup and pruning.

    RUN/checkpoints/step-00000100/
        backend/            the backend's own checkpoint (DeepSpeed folder, FSDP2 DCP, or state.pt)
        rng/rank-R.pt       every rank's RNG states (tensors and lists: weights_only loading)
        trainer.json        step, samples consumed, data stream state, world size, backend, full config
        model/              the consolidated model directory (tlm_config.json + model.safetensors + tokenizer)
        COMPLETE            written last, after every rank has finished writing
    RUN/checkpoints/latest  the name of the newest complete checkpoint (moved after COMPLETE)

A checkpoint without COMPLETE (killed while saving) is never loaded: `--resume auto` takes the newest
complete one and says which incomplete ones it passed over.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlm.errors import CheckpointError
from tlm.fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger("tlm")
COMPLETE = "COMPLETE"
TRAINER = "trainer.json"


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


def mark_complete(run_dir: Path, path: Path) -> None:
    """COMPLETE, then the `latest` pointer: the order that makes a checkpoint visible only when whole."""
    atomic_write_bytes(path / COMPLETE, b"")
    atomic_write_bytes(run_dir / "checkpoints" / "latest", (path.name + "\n").encode())


def read_trainer_state(path: Path) -> dict[str, Any]:
    if not is_complete(path):
        raise CheckpointError(f"checkpoint '{path}' is incomplete (no {COMPLETE} marker): it was interrupted while saving")
    try:
        return json.loads((path / TRAINER).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / TRAINER}: not valid JSON ({e})") from None


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: None for 'none' or a fresh run, the newest complete for 'auto'."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume: '{resume}' does not exist")
        read_trainer_state(path)
        return path
    root = run_dir / "checkpoints"
    candidates = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
    skipped = []
    for path in candidates:
        if is_complete(path):
            if skipped:
                log.warning("skipping incomplete checkpoints (interrupted while saving): %s", ", ".join(p.name for p in skipped))
            return path
        skipped.append(path)
    if skipped:
        log.warning("no complete checkpoint in %s (incomplete: %s); starting afresh", root, ", ".join(p.name for p in skipped))
    return None


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (and incomplete ones older than them)."""
    root = run_dir / "checkpoints"
    complete = sorted(p for p in root.glob("step-*") if is_complete(p))
    if keep_last <= 0 or len(complete) <= keep_last:
        return
    oldest_kept = complete[-keep_last]
    for path in sorted(root.glob("step-*")):
        if path < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)
