"""Data for a training run: a prepared folder, or raw text tokenized and prepared on first use.

First use happens on rank 0 while the other ranks wait; the results are cached under `data.cache_dir`, the
tokenizer by the content of the text it is trained on, the prepared data by its full fingerprint (settings,
tokenizer and the sha256 of every source), so an edited source is prepared anew, never served stale. Two
runs that need the same cache entry at once take turns (a lock on the entry); the second finds it ready.

When the run resumes a checkpoint, the data it was trained on (`expect`, from trainer.json) is compared with
the data of this run before anything is tokenized or prepared.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from data_pipeline.dataset import load_manifest
from tlm.training.backends import from_rank0
from data_pipeline.errors import CheckpointError, ConfigError
from data_pipeline.locks import FolderLock
from tlm.checkpointing.resume_check import NEW_RUN
from tlm.training.config import TrainConfig

log = logging.getLogger("tlm")


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _refuse_changed_sources(expect: dict[str, Any] | None, sources: list[dict[str, Any]]) -> None:
    """Before any tokenizing: the sources of a resumed run must be the bytes its checkpoint was trained on."""
    inputs = (expect or {}).get("inputs")
    if not inputs:
        return
    from data_pipeline.prepare import input_changes

    old = [{"path": s["path"], "sha256": s.get("sha256")} for s in inputs.get("sources", [])]
    new = [{"path": s["path"], "sha256": s["sha256"]} for s in sources]
    if [s["sha256"] for s in old] != [s["sha256"] for s in new]:
        changes = input_changes({"sources": old}, {"sources": new})
        raise CheckpointError(f"cannot resume: the data differs from what the checkpoint was trained on ({changes}); "
                              f"restore it, or {NEW_RUN}")


def resolve_data(config: TrainConfig, is_main: bool, expect: dict[str, Any] | None = None) -> tuple[Path, Path | None]:
    """(prepared dataset folder, tokenizer folder) for the run, preparing them on rank 0 if needed."""
    data = config.data
    if data.prepared is not None:
        path = Path(data.prepared)
        manifest = load_manifest(path)  # clear error when the folder is missing or unfinished
        tokenizer = Path(data.tokenizer) if data.tokenizer else Path(manifest["tokenizer"]["path"])
        return path, tokenizer if (tokenizer / "tokenizer.json").is_file() else None

    from data_pipeline import default_data
    from data_pipeline.prepare import PrepareConfig, describe_inputs, fingerprint_of, prepare
    from data_pipeline.sources import resolve_sources

    source, val_source, held_out = default_data(data.source, data.val_source, data.val_fraction)
    cache = Path(data.cache_dir)
    train_sources = resolve_sources(_as_list(source))
    val_sources = resolve_sources(_as_list(val_source)) if val_source is not None else []
    digests = from_rank0([{"path": s.path, "sha256": s.content_sha256()} for s in train_sources + val_sources]
                          if is_main else None)
    if is_main:
        _refuse_changed_sources(expect, digests)
    tokenizer = Path(data.tokenizer) if data.tokenizer else \
        cache / f"tokenizer-{_key([d['sha256'] for d in digests[:len(train_sources)]], data.vocab_size)}"
    if is_main and not (tokenizer / "tokenizer.json").is_file():
        if data.tokenizer:
            raise ConfigError(f"data.tokenizer '{data.tokenizer}' has no tokenizer.json")
        with FolderLock(tokenizer, "tokenizer cache entry", wait=True):
            if not (tokenizer / "tokenizer.json").is_file():  # another run may have made it while we waited
                from data_pipeline.sources import DocumentReader
                from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

                log.info("training a %d-token tokenizer on %s (first use) -> %s", data.vocab_size, source, tokenizer)
                trained = train_tokenizer(DocumentReader(train_sources), vocab_size=data.vocab_size, show_progress=False)
                save_tokenizer(trained, tokenizer)
    _barrier()
    from data_pipeline.tokenizer import tokenizer_sha256

    vals = None if val_source is None else _as_list(val_source)
    prepare_config = PrepareConfig(data=_as_list(source), tokenizer=str(tokenizer), out="", seq_len=data.seq_len,
                                   pack=data.pack, val=held_out, val_data=vals)
    if is_main:
        described = describe_inputs(prepare_config, train_sources + val_sources, tokenizer_sha256(tokenizer),
                                    [d["sha256"] for d in digests])
        prepared = cache / f"data-{fingerprint_of(described)[:16]}"
    prepared = Path(from_rank0(str(prepared) if is_main else None))
    prepare_config.out = str(prepared)
    if is_main and not (prepared / "manifest.json").is_file():
        log.info("preparing %s (first use) -> %s", source, prepared)
        prepare(prepare_config, progress=False, wait=True)
    _barrier()
    return prepared, tokenizer
