"""Data for a training run: a prepared folder, or raw text tokenized and prepared on first use.

First use happens on rank 0 while the other ranks wait; the results are cached under `data.cache_dir`
by a hash of what determines them, so later runs (and other ranks) find them ready.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch.distributed as dist

from data_pipeline.dataset import load_manifest
from tlm.errors import ConfigError
from tlm.train_config import TrainConfig

log = logging.getLogger("tlm")


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_data(config: TrainConfig, is_main: bool) -> tuple[Path, Path | None]:
    """(prepared dataset folder, tokenizer folder) for the run, preparing them on rank 0 if needed."""
    data = config.data
    if data.prepared is not None:
        path = Path(data.prepared)
        manifest = load_manifest(path)  # clear error when the folder is missing or unfinished
        tokenizer = Path(data.tokenizer) if data.tokenizer else Path(manifest["tokenizer"]["path"])
        return path, tokenizer if (tokenizer / "tokenizer.json").is_file() else None

    from data_pipeline import DEMO_TRAIN, DEMO_VAL

    source = data.source if data.source is not None else str(DEMO_TRAIN)
    val_source = data.val_source if data.val_source is not None else (str(DEMO_VAL) if data.source is None else None)
    cache = Path(data.cache_dir)
    tokenizer = Path(data.tokenizer) if data.tokenizer else cache / f"tokenizer-{_key(source, data.vocab_size)}"
    if is_main and not (tokenizer / "tokenizer.json").is_file():
        if data.tokenizer:
            raise ConfigError(f"data.tokenizer '{data.tokenizer}' has no tokenizer.json")
        from data_pipeline.sources import DocumentReader, resolve_sources
        from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

        log.info("training a %d-token tokenizer on %s (first use) -> %s", data.vocab_size, source, tokenizer)
        trained = train_tokenizer(DocumentReader(resolve_sources(source)), vocab_size=data.vocab_size, show_progress=False)
        save_tokenizer(trained, tokenizer)
    _barrier()
    from data_pipeline.tokenizer import tokenizer_sha256

    prepared = cache / f"data-{_key(source, val_source, tokenizer_sha256(tokenizer), data.seq_len, data.pack)}"
    if is_main and not (prepared / "manifest.json").is_file():
        from data_pipeline.prepare import PrepareConfig, prepare

        log.info("preparing %s (first use) -> %s", source, prepared)
        sources = source if isinstance(source, (list, tuple)) else [source]
        vals = None if val_source is None else (val_source if isinstance(val_source, (list, tuple)) else [val_source])
        prepare(PrepareConfig(data=[str(s) for s in sources], tokenizer=str(tokenizer), out=str(prepared),
                              seq_len=data.seq_len, pack=data.pack, val=0.0 if vals else 0.01,
                              val_data=[str(v) for v in vals] if vals else None), progress=False)
    _barrier()
    return prepared, tokenizer
