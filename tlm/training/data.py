"""Data for a training run: a prepared folder, or raw text tokenized and prepared on first use.

First use happens on rank 0 while the other ranks wait; the results are cached under `data.cache_dir`, the
tokenizer by the content of the text it is trained on, the prepared data by its full fingerprint (settings,
tokenizer and the sha256 of every source), so an edited source is prepared anew, never served stale. Two
runs that need the same cache entry at once take turns (a lock on the entry); the second finds it ready.

When the run resumes a checkpoint, the data it was trained on (`expect`, from trainer.json) is compared with
the data of this run before anything is tokenized or prepared.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.dataset import TokenRows, load_manifest
from tlm.training.distributed import barrier, from_rank0
from tlm_base.errors import CheckpointError, ConfigError
from tlm_base.locks import FolderLock
from tlm.training.config import NEW_RUN
from tlm.model.config import ModelConfig
from tlm.training.config import TrainConfig

log = logging.getLogger("tlm")


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _refuse_changed_sources(expect: dict[str, Any] | None, sources: list[dict[str, Any]]) -> None:
    """Before any tokenizing: the sources of a resumed run must be the bytes its checkpoint was trained on."""
    inputs = (expect or {}).get("inputs")
    if not inputs:
        return
    from data_pipeline.prepare_config import input_changes

    old = [{"path": s["path"], "sha256": s.get("sha256")} for s in inputs.get("sources", [])]
    new = [{"path": s["path"], "sha256": s["sha256"]} for s in sources]
    if [s["sha256"] for s in old] != [s["sha256"] for s in new]:
        changes = input_changes({"sources": old}, {"sources": new})
        raise CheckpointError(f"cannot resume: the data differs from what the checkpoint was trained on ({changes}); "
                              f"restore it, or {NEW_RUN}")


def _tokenizer_of(config: TrainConfig, manifest: dict[str, Any]) -> Path | None:
    """The tokenizer of a prepared folder: data.tokenizer, else the one its manifest names (None when gone)."""
    tokenizer = Path(config.data.tokenizer) if config.data.tokenizer else Path(manifest["tokenizer"]["path"])
    return tokenizer if (tokenizer / "tokenizer.json").is_file() else None


def resolve_data(config: TrainConfig, is_main: bool, expect: dict[str, Any] | None = None) -> tuple[Path, Path | None]:
    """(prepared dataset folder, tokenizer folder) for the run, preparing them on rank 0 if needed."""
    data = config.data
    if data.prepared is not None:
        path = Path(data.prepared)
        manifest = load_manifest(path)  # clear error when the folder is missing or unfinished
        return path, _tokenizer_of(config, manifest)

    from data_pipeline import default_data
    from data_pipeline.prepare import prepare
    from data_pipeline.prepare_config import PrepareConfig, describe_inputs, fingerprint_of
    from data_pipeline.sources import resolve_sources

    source, val_source, held_out = default_data(data.source, data.val_source, data.val_fraction)
    cache = Path(data.cache_dir)
    train_sources = resolve_sources(_as_list(source))
    val_sources = resolve_sources(_as_list(val_source)) if val_source is not None else []
    digests = from_rank0([{"path": s.path, "sha256": s.content_sha256()} for s in train_sources + val_sources]
                          if is_main else None)
    if is_main:
        _refuse_changed_sources(expect, digests)
    key = _key([d["sha256"] for d in digests[:len(train_sources)]], data.vocab_size, data.text_field, data.sample_by)
    tokenizer = Path(data.tokenizer) if data.tokenizer else cache / f"tokenizer-{key}"
    if is_main and not (tokenizer / "tokenizer.json").is_file():
        if data.tokenizer:
            raise ConfigError(f"data.tokenizer '{data.tokenizer}' has no tokenizer.json")
        with FolderLock(tokenizer, "tokenizer cache entry", wait=True):
            if not (tokenizer / "tokenizer.json").is_file():  # another run may have made it while we waited
                from data_pipeline.documents import DocumentReader
                from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

                log.info("training a %d-token tokenizer on %s (first use) -> %s", data.vocab_size, source, tokenizer)
                reader = DocumentReader(train_sources, text_field=data.text_field, sample_by=data.sample_by,
                                        on_error=data.on_error)
                trained = train_tokenizer(reader, vocab_size=data.vocab_size, show_progress=False)
                save_tokenizer(trained, tokenizer)
    barrier()
    from data_pipeline.tokenizer import tokenizer_sha256

    vals = None if val_source is None else _as_list(val_source)
    prepare_config = PrepareConfig(data=_as_list(source), tokenizer=str(tokenizer), out="", seq_len=data.seq_len,
                                   pack=data.pack, val=held_out, val_data=vals, text_field=data.text_field,
                                   sample_by=data.sample_by, on_error=data.on_error)
    if is_main:
        described = describe_inputs(prepare_config, train_sources + val_sources, tokenizer_sha256(tokenizer),
                                    [d["sha256"] for d in digests])
        prepared = cache / f"data-{fingerprint_of(described)[:16]}"
    prepared = Path(from_rank0(str(prepared) if is_main else None))
    prepare_config.out = str(prepared)
    if is_main and not (prepared / "manifest.json").is_file():
        log.info("preparing %s (first use) -> %s", source, prepared)
        prepare(prepare_config, progress=False, wait=True)
    barrier()
    return prepared, tokenizer


@dataclass
class RunData:
    """The data of a run, checked: the train (and val) rows, the tokenizer, the model config with the tokenizer's
    special ids, and the identity a checkpoint records (fingerprint, tokenizer sha256, inputs)."""

    rows: TokenRows
    val_rows: TokenRows | None
    tokenizer_dir: Path | None
    model_config: ModelConfig
    identity: dict[str, Any]
    val_sets: dict[str, TokenRows] | None = None
    """A mixture's validation splits, by part name (then `val_rows` is None)."""

    @property
    def packed(self) -> bool:
        return self.rows.pack

    @functools.cached_property
    def token_bytes(self) -> np.ndarray | None:
        """Each token id's UTF-8 byte count (for bits per byte); None without a tokenizer."""
        if self.tokenizer_dir is None:
            return None
        from tlm.training.evaluate import byte_table

        return byte_table(self.tokenizer_dir, self.model_config.vocab_size)


def model_config_for(config: TrainConfig, tokenizer_dir: Path | None) -> ModelConfig:
    """The run's model config, its bos/eos/pad ids taken from the tokenizer unless the config sets them."""
    model_config = config.model
    if tokenizer_dir is not None:
        from data_pipeline.tokenizer_files import special_token_ids

        ids = {k: v for k, v in special_token_ids(tokenizer_dir).items()
               if k not in config.model_keys or getattr(config.model, k) is None}  # None: the tokenizer's
        model_config = model_config.replace(**ids)
    return model_config


def _model_for_data(config: TrainConfig, manifest: dict[str, Any], tokenizer_dir: Path | None,
                    where: str) -> tuple[ModelConfig, str | None]:
    """The run's model config (special ids from the tokenizer) and the tokenizer's sha256, once the data's packing
    mode is the one the config asks for."""
    if (manifest["mode"] == "pack") != config.data.pack:
        raise ConfigError(f"data.pack is {config.data.pack} but {where} was prepared in {manifest['mode']} mode")
    tok_sha = None
    if tokenizer_dir is not None:
        from data_pipeline.tokenizer import tokenizer_sha256

        tok_sha = tokenizer_sha256(tokenizer_dir)
    return model_config_for(config, tokenizer_dir), tok_sha


def load_run_data(config: TrainConfig, is_main: bool, expect: dict[str, Any] | None = None) -> RunData:
    """Resolve (and on first use prepare) the run's data, then check it before step 1: the packing mode, the
    tokenizer, the sequence length, token ids within the vocabulary. Rank 0 verifies every shard's sha256."""
    from data_pipeline.dataset import check_compatible, check_token_range

    if config.data.mix is not None:
        return load_mixture(config, is_main)
    prepared, tokenizer_dir = resolve_data(config, is_main, expect)
    verify = "sha256" if is_main else "size"
    rows = TokenRows(prepared, "train", verify=verify)
    manifest = rows.manifest
    model_config, tok_sha = _model_for_data(config, manifest, tokenizer_dir, str(prepared))
    check_compatible(manifest, model_config.vocab_size, config.data.seq_len, tok_sha, where=str(prepared))
    val_rows = TokenRows(prepared, "val", verify=verify) if manifest["splits"]["val"]["rows"] else None
    if val_rows is None and is_main and (config.eval.every or config.eval.at_start or config.eval.final_full):
        log.warning("%s has no validation rows: this run logs no validation loss (give the data a held-out split: "
                    "data.val_source, data.val_fraction, or --val / --val_data of tlm prepare)", prepared)
    for split in (rows, val_rows):  # before step 1: an id past the embedding is a crash on a GPU
        if split is not None:
            check_token_range(split, model_config.vocab_size)
    identity = {"fingerprint": manifest["fingerprint"], "tokenizer_sha256": tok_sha, "prepared": str(prepared),
                "inputs": manifest.get("inputs")}
    return RunData(rows, val_rows, tokenizer_dir, model_config, identity)


def load_mixture(config: TrainConfig, is_main: bool) -> RunData:
    """`data.mix`: the parts' train splits as one weighted set of rows, each part's validation split apart; the
    same checks as a single prepared folder, for every part."""
    from data_pipeline.dataset import check_compatible, check_token_range
    from data_pipeline.mixture import MixedRows, parse_mix

    parts = parse_mix(config.data.mix)
    verify = "sha256" if is_main else "size"
    rows = MixedRows(parts, seed=config.train.seed, verify=verify)
    manifest = rows.manifest
    tokenizer_dir = _tokenizer_of(config, manifest)
    model_config, tok_sha = _model_for_data(config, manifest, tokenizer_dir, "data.mix")
    val_sets = {}
    for part, part_rows in zip(parts, rows.rows):
        check_compatible(part_rows.manifest, model_config.vocab_size, config.data.seq_len, tok_sha, where=part.path)
        check_token_range(part_rows, model_config.vocab_size)
        if part_rows.manifest["splits"]["val"]["rows"]:
            val_sets[part.name] = TokenRows(part.path, "val", verify=verify)
            check_token_range(val_sets[part.name], model_config.vocab_size)
    if is_main:
        log.info("data mixture, one pass = %d rows: %s", len(rows), ", ".join(
            f"{d['name']} weight {d['weight']:g}: {d['rows_per_pass']} rows ({d['epochs_per_pass']:.2f} epochs of "
            f"{d['rows']})" for d in rows.describe()))
        if not val_sets and (config.eval.every or config.eval.at_start or config.eval.final_full):
            log.warning("no part of data.mix has validation rows: this run logs no validation loss")
    identity = {"fingerprint": rows.fingerprint, "tokenizer_sha256": tok_sha,
                "prepared": [p.path for p in parts], "inputs": {"mix": rows.describe()}}
    return RunData(rows, None, tokenizer_dir, model_config, identity, val_sets or None)
