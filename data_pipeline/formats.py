"""Schemas of the files a prepared dataset is made of: manifest.json and the prepare journal's lines.

The manifest is checked as a whole before any shard is opened: types, required keys, ranges, shard names
that are plain files inside the folder, row_length = seq_len + 1, the token dtype the vocabulary needs, and
every split's rows and tokens equal to the sums over its shards. The shards themselves are then checked
against it (size, sha256, Arrow schema, rows, largest token id) by `TokenRows`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from data_pipeline.shards import FORMAT, FORMAT_VERSION
from tlm_base.schema import NonNegInt, PosInt, RelativeFile, Schema, Sha256, StrictBool, StrictInt, StrictStr


class ShardEntry(Schema):
    file: RelativeFile
    rows: PosInt
    tokens: NonNegInt
    documents: NonNegInt
    bytes: PosInt
    sha256: Sha256
    max_token_id: NonNegInt | None = None
    """Largest token id in the shard, recorded as it is written (absent before tlm recorded it: then scanned)."""


class SplitInfo(Schema):
    rows: NonNegInt
    tokens: NonNegInt
    documents: NonNegInt
    dropped_tokens: NonNegInt = 0
    truncated_documents: NonNegInt = 0
    shards: list[ShardEntry]

    @model_validator(mode="after")
    def _sums(self) -> "SplitInfo":
        rows, tokens = sum(s.rows for s in self.shards), sum(s.tokens for s in self.shards)
        if rows != self.rows:
            raise ValueError(f"rows is {self.rows} but its shards hold {rows}")
        if tokens != self.tokens:
            raise ValueError(f"tokens is {self.tokens} but its shards hold {tokens}")
        return self


class Splits(Schema):
    train: SplitInfo
    val: SplitInfo


class TokenizerInfo(Schema):
    sha256: Sha256
    vocab_size: PosInt
    eot_token_id: NonNegInt
    pad_token_id: NonNegInt
    path: StrictStr

    @model_validator(mode="after")
    def _ids(self) -> "TokenizerInfo":
        for key in ("eot_token_id", "pad_token_id"):
            if getattr(self, key) >= self.vocab_size:
                raise ValueError(f"{key} {getattr(self, key)} is outside the vocabulary of {self.vocab_size}")
        return self


class DatasetManifest(Schema):
    format: Literal[FORMAT]  # type: ignore[valid-type]
    format_version: Annotated[StrictInt, Field(ge=1, le=FORMAT_VERSION)]
    fingerprint: Sha256
    seq_len: PosInt
    row_length: PosInt
    mode: Literal["pack", "nopack"]
    dtype: Literal["uint16", "uint32"]
    tokenizer: TokenizerInfo
    splits: Splits
    skipped: dict[str, Any] = {}
    sources: list[dict[str, Any]] = []

    @model_validator(mode="after")
    def _shape(self) -> "DatasetManifest":
        if self.row_length != self.seq_len + 1:
            raise ValueError(f"row_length {self.row_length} is not seq_len + 1 ({self.seq_len + 1})")
        needed = "uint16" if self.tokenizer.vocab_size <= 1 << 16 else "uint32"
        if self.dtype != needed:
            raise ValueError(f"dtype {self.dtype} does not fit a vocabulary of {self.tokenizer.vocab_size} ({needed})")
        if self.splits.train.rows == 0:
            raise ValueError("the train split has no rows")
        return self



class JournalHeader(Schema):
    fingerprint: Sha256
    described: dict[str, Any] | None = None


class SplitStateEntry(Schema):
    shards: list[ShardEntry]
    rows: NonNegInt
    tokens: NonNegInt
    documents: NonNegInt
    truncated_documents: NonNegInt = 0
    resume_piece: NonNegInt
    resume_offset: NonNegInt
    skip_rest_of_document: StrictBool = False
    stop_after: NonNegInt | None = None


class ReadPosition(Schema):
    """How far the source being read had been read when a shard was committed, and the sha256 of those bytes."""

    source: NonNegInt
    bytes: NonNegInt
    sha256: Sha256


class JournalEntry(Schema):
    split: Literal["train", "val"]
    state: SplitStateEntry
    read: ReadPosition | None = None
