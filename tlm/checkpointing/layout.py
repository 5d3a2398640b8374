"""What a checkpoint folder holds and how it is read back: the files' names, the schemas of trainer.json and
COMPLETE, and the checks that make a checkpoint loadable (complete, every file as its manifest says). The
layer below the lineage (tlm.checkpointing.lineage) and the Checkpointer (tlm.checkpointing.checkpoints).

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
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from tlm_base.errors import CheckpointError
from tlm_base.fileio import sha256_file
from tlm_base.schema import (
    Field, NonNegInt, PosInt, RelativeFile, Schema, Sha256, StrictBool, StrictInt, StrictStr, load_json_text, parse,
)

STEP_NAME = re.compile(r"step-(\d{8})")
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
    val_loss_periodic: float | None = None
    """At a final evaluation of the whole split: the loss over the rows the periodic evaluations cover."""


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


