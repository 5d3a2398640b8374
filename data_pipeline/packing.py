"""Tokens into rows into shards: each split's writer packs documents into rows of seq_len + 1 (or one row per
document, padded, in no-pack mode) and commits whole shards (fsync + rename), recording where the input stood."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.prepare_config import PrepareConfig
from data_pipeline.shards import BATCH_ROWS, ShardFile, shard_schema


@dataclass
class SplitState:
    """What is committed for a split: its shards, totals and where the input continues."""

    shards: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    tokens: int = 0
    documents: int = 0
    truncated_documents: int = 0
    resume_piece: int = 0
    resume_offset: int = 0
    skip_rest_of_document: bool = False
    # --max_tokens: the reading position (piece number over all splits) at which the train split filled up;
    # nothing after it is written to any split, also after a resume
    stop_after: int | None = None


class SplitWriter:
    """Turns the token stream of one split into rows and committed shards."""

    def __init__(self, out: Path, split: str, config: PrepareConfig, eot: int, dtype: np.dtype,
                 state: SplitState, on_commit) -> None:
        self.out, self.split, self.pack = out, split, config.pack
        self.row_length = config.seq_len + 1
        self.eot = eot
        self.dtype = dtype
        self.schema = shard_schema(self.row_length, dtype, config.pack)
        row_bytes = self.row_length * dtype.itemsize
        self.shard_rows = max(BATCH_ROWS, int(config.shard_mb * 2**20 / row_bytes) // BATCH_ROWS * BATCH_ROWS)
        self.state = state
        self.on_commit = on_commit
        self.next_piece = 0  # ordinal of the next piece of this split's stream
        self.last_added = state.resume_piece - 1
        self.buffer = np.empty(0, dtype=dtype)
        self.pieces: deque[tuple[int, int, int]] = deque()  # (ordinal, start token, length) in the buffer
        self.doc_tokens: list[np.ndarray] = []  # no-pack: the current document's first tokens
        self.doc_done = state.skip_rest_of_document
        self.shard: ShardFile | None = None
        self.dropped_tokens = 0
        self.documents_fed = 0
        self.truncated_in_shard = 0  # no-pack: documents cut to the row length in the open shard
        self.max_rows = -(-config.max_tokens // self.row_length) if config.max_tokens and split == "train" else None

    def claim(self) -> tuple[int, bool]:
        """Ordinal for the next piece, and whether it must be tokenized (False: before the resume point)."""
        ordinal = self.next_piece
        self.next_piece += 1
        return ordinal, ordinal >= self.state.resume_piece

    def add(self, ordinal: int, ids: np.ndarray, final: bool, position: int = 0) -> None:
        self.position = position  # the reading position, recorded as stop_after when --max_tokens is reached
        if self.pack:
            self._add_packed(ordinal, ids, final)
        else:
            self._add_unpacked(ordinal, ids, final)

    # --- pack mode ---------------------------------------------------------------------------------

    def _add_packed(self, ordinal: int, ids: np.ndarray, final: bool) -> None:
        tokens = np.append(ids, self.eot).astype(self.dtype) if final else ids
        offset = self.state.resume_offset if ordinal == self.state.resume_piece else 0
        # Stream position where the whole piece starts: tokens already in rows + tokens still buffered.
        start = self.state.rows * self.row_length + len(self.buffer) - offset
        self.pieces.append((ordinal, start, len(tokens)))
        self.last_added = ordinal
        self.buffer = np.concatenate([self.buffer, tokens[offset:]])
        full = len(self.buffer) // self.row_length
        if full:
            rows = self.buffer[: full * self.row_length].reshape(full, self.row_length)
            self.buffer = self.buffer[full * self.row_length :]
            self._emit(rows)
        self._locate(self.state.rows * self.row_length)  # forget pieces already wholly in rows

    def _locate(self, position: int) -> tuple[int, int]:
        """(piece ordinal, offset) of token `position` of the stream; drops pieces wholly before it."""
        while self.pieces and self.pieces[0][1] + self.pieces[0][2] <= position:
            self.pieces.popleft()
        if not self.pieces:
            return self.last_added + 1, 0
        ordinal, start, _ = self.pieces[0]
        return ordinal, position - start

    # --- no-pack mode ------------------------------------------------------------------------------

    def _add_unpacked(self, ordinal: int, ids: np.ndarray, final: bool) -> None:
        if not self.doc_done:
            self.doc_tokens.append(ids)
            have = sum(len(t) for t in self.doc_tokens)
            if have >= self.row_length or final:
                tokens = np.concatenate(self.doc_tokens)
                if final:
                    tokens = np.append(tokens, self.eot)
                if len(tokens) > self.row_length:
                    self.truncated_in_shard += 1
                tokens = tokens[: self.row_length].astype(self.dtype)
                row = np.full((1, self.row_length), self.eot, dtype=self.dtype)
                row[0, : len(tokens)] = tokens
                self.doc_tokens, self.doc_done = [], not final
                self._last_piece = (ordinal, final)
                self._emit(row, np.array([len(tokens)], dtype=np.int32))
        if final:
            self.doc_done = False

    # --- shards ------------------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """The split holds the rows --max_tokens asks for."""
        return self.max_rows is not None and self.state.rows >= self.max_rows

    def _emit(self, rows: np.ndarray, lengths: np.ndarray | None = None) -> None:
        if self.max_rows is not None:  # the first max_rows rows of the stream, wherever the batches fell
            rows = rows[: max(0, self.max_rows - self.state.rows)]
            lengths = None if lengths is None else lengths[: len(rows)]
            if len(rows) and self.state.rows + len(rows) >= self.max_rows:
                self.state.stop_after = self.position  # before the commit below journals the state
        while len(rows):
            if self.shard is None:
                name = f"{self.split}-{len(self.state.shards):05d}.arrow"
                self.shard = ShardFile(self.out / name, self.schema, self.row_length, self.pack, self.eot)
            room = self.shard_rows - self.shard.rows
            self.shard.add(rows[:room], None if lengths is None else lengths[:room])
            self.state.rows += min(room, len(rows))
            rows = rows[room:]
            lengths = None if lengths is None else lengths[room:]
            if self.shard.rows == self.shard_rows:
                self._commit()

    def _commit(self) -> None:
        entry = self.shard.close()
        self.shard = None
        self.state.shards.append(entry)
        self.state.tokens += entry["tokens"]
        self.state.documents += entry["documents"]
        self.state.truncated_documents += self.truncated_in_shard
        self.truncated_in_shard = 0
        if self.pack:
            self.state.resume_piece, self.state.resume_offset = self._locate(self.state.rows * self.row_length)
        else:
            ordinal, final = self._last_piece
            self.state.resume_piece, self.state.resume_offset = ordinal + 1, 0
            self.state.skip_rest_of_document = not final
        self.on_commit(self.split, self.state)

    def finish(self) -> None:
        """Commit the last, partial shard; in pack mode the tail shorter than a row is dropped."""
        if self.pack:
            self.dropped_tokens = len(self.buffer)
        if self.shard is not None and self.shard.rows:
            self._commit()
        elif self.shard is not None:
            self.shard.abort()

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()
