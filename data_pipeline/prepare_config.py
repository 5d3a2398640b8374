"""What determines a prepared dataset: its settings (PrepareConfig, checked when made), its inputs described by
content (every source's sha256, the tokenizer's), and the fingerprint of both that says whether a finished dataset
or an interrupted prepare may be reused."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from data_pipeline.pieces import PIECE_CHARS
from data_pipeline.sources import MAX_DOCUMENT_MB, MAX_LINE_MB, SAMPLE_BY, Source
from tlm_base.errors import DataError

log = logging.getLogger("tlm.prepare")
OPTIONAL_SETTINGS = ("eot_token", "hf_config", "max_tokens")


# The size bounds change the output only where they skip (--on_error skip): part of the fingerprint there alone,
# and only when not the default (datasets prepared before the bounds existed keep their fingerprint).
BOUNDS = {"max_line_mb": MAX_LINE_MB, "max_document_mb": MAX_DOCUMENT_MB}


SPLITS = ("train", "val")


@dataclass
class PrepareConfig:
    """Everything that determines the output of `prepare` (its hash guards resuming)."""

    data: list[str]
    tokenizer: str
    out: str
    seq_len: int = 512
    pack: bool = True
    text_field: str = "text"
    sample_by: str = "document"
    on_error: str = "raise"
    hf_split: str = "train"
    val: float | int = 0.0
    val_data: list[str] | None = None
    seed: int = 0
    shard_mb: float = 256.0
    num_workers: int = 1
    worker_index: int = 0
    piece_chars: int = PIECE_CHARS
    tokenize_batch_chars: int = 1 << 19
    eot_token: str | None = None  # the document separator; None: <|endoftext|> (another tokenizer's EOS, in eval)
    hf_config: str | None = None  # the configuration (subset) of a Hugging Face dataset
    max_tokens: int | None = None  # stop once the train split holds this many tokens (rounded up to whole rows)
    max_line_mb: float = MAX_LINE_MB  # the longest line parsed whole (a JSONL record, a CSV row), in MiB
    max_document_mb: float = MAX_DOCUMENT_MB  # the longest document, in MiB of characters

    def __post_init__(self) -> None:
        for name in ("seq_len", "num_workers", "piece_chars", "tokenize_batch_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"--{name} must be a positive whole number, got {value!r}")
        if isinstance(self.worker_index, bool) or not isinstance(self.worker_index, int):
            raise DataError(f"--worker_index must be a whole number, got {self.worker_index!r}")
        for name, low in (("shard_mb", 0), ("max_line_mb", None), ("max_document_mb", None)):  # (shard_mb 0: 1024 rows)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < (low or 0) or (low is None and value == 0):
                raise DataError(f"--{name} must be a finite number of MiB {'>= 0' if low == 0 else '> 0'}, got {value!r}")
        if self.sample_by not in SAMPLE_BY:
            raise DataError(f"--sample_by must be one of {', '.join(SAMPLE_BY)}, got {self.sample_by!r}")
        if self.on_error not in ("raise", "skip"):
            raise DataError(f"--on_error must be raise or skip, got {self.on_error!r}")
        if isinstance(self.val, bool) or not isinstance(self.val, (int, float)) or not math.isfinite(self.val) \
                or self.val < 0:
            raise DataError(f"--val must be a fraction in [0, 1) or a number of documents, got {self.val!r}")
        if isinstance(self.val, float) and self.val >= 1:
            raise DataError(f"--val {self.val}: a fraction must be below 1 (give an int for a number of documents)")
        if self.val_data and self.val:
            raise DataError("give either --val (held out from --data) or --val_data (a separate source), not both")
        if not 0 <= self.worker_index < self.num_workers:
            raise DataError(f"--worker_index must be in [0, {self.num_workers}), got {self.worker_index}")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise DataError(f"--max_tokens must be a positive number of tokens, got {self.max_tokens!r}")
        if self.num_workers > 1 and isinstance(self.val, int) and self.val:
            raise DataError("--val N (a count of documents) needs one worker; give a fraction or --val_data")


def describe_inputs(config: PrepareConfig, sources: list[Source], tok_sha: str,
                    digests: list[str | None] | None = None) -> dict[str, Any]:
    """Everything that determines the output: settings, the tokenizer's sha256 and every source's content.

    Sources are identified by the sha256 of their bytes, read once at the start (about 2 GB/s here, some
    hundred times faster than tokenizing them), so an edit that keeps the size and even the mtime is seen.
    """
    start = time.perf_counter()
    described = {
        # (settings added later only when set: datasets prepared before they existed keep their fingerprint)
        **{k: v for k, v in asdict(config).items()
           if k not in ("out", "tokenizer", "data", "val_data") and not (k in OPTIONAL_SETTINGS and v is None)
           and not (k in BOUNDS and (v == BOUNDS[k] or config.on_error == "raise"))},
        "tokenizer_sha256": tok_sha,
        "sources": [{"kind": s.kind, "path": s.path, "bytes": s.size,
                     "sha256": digests[i] if digests is not None else s.content_sha256()} for i, s in enumerate(sources)],
    }
    seconds = time.perf_counter() - start
    if seconds > 2:
        log.info("hashed %d sources in %.1f s", len(sources), seconds)
    return described


def fingerprint_of(described: dict[str, Any]) -> str:
    """The hash of `describe_inputs`: sources count by content (their path only where there is no content
    hash, a hub dataset), so the same bytes under another path or working directory are the same data."""
    identity = {**described, "sources": [{"kind": s["kind"], "bytes": s["bytes"], "sha256": s["sha256"]} if s["sha256"]
                                         else {"kind": s["kind"], "path": s["path"]} for s in described["sources"]]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def input_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """What differs between two `describe_inputs` results, for the message that refuses to mix them."""
    if not old:
        return "settings recorded by an older tlm"
    changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if k != "sources" and old.get(k) != new.get(k)]
    before = {s["path"]: s for s in old.get("sources", [])}
    after = {s["path"]: s for s in new["sources"]}
    for path in sorted(set(before) | set(after)):
        a, b = before.get(path), after.get(path)
        if a is None:
            changes.append(f"source {path} added")
        elif b is None:
            changes.append(f"source {path} removed")
        elif a != b:
            changes.append(f"source {path} changed (sha256 {str(a.get('sha256'))[:12]}... -> {str(b.get('sha256'))[:12]}..., "
                           f"{a.get('bytes')} -> {b.get('bytes')} bytes)")
    if not changes and [s["path"] for s in old.get("sources", [])] != [s["path"] for s in new["sources"]]:
        changes.append("the order of the sources")
    return "; ".join(changes) or "the settings"


def val_selector(config: PrepareConfig):
    """A function (source index, record, document number) -> True when the document is held out."""
    if isinstance(config.val, int) and config.val:
        return lambda source, record, number: number < config.val
    if config.val:
        threshold = int(config.val * 2**64)

        def by_hash(source: int, record: int, number: int) -> bool:
            digest = hashlib.blake2b(f"{config.seed}:{source}:{record}".encode(), digest_size=8).digest()
            return int.from_bytes(digest, "little") < threshold

        return by_hash
    return lambda source, record, number: False
