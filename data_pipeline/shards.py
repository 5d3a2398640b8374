"""Arrow IPC token shards: the writer used by `prepare` and the manifest format both sides share.

A shard is an Arrow IPC *file* (random access, memory-mappable) with one column `input_ids` of
`fixed_size_list<uint16, seq_len + 1>` (uint32 for vocabularies over 65,536), plus `length` (int32, the
real tokens of the row) in no-pack mode. Record batches hold BATCH_ROWS rows (the last of a shard may
hold fewer). A shard is written under a temporary name, fsynced, hashed and renamed: a name without
`.tmp` is always a complete shard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tlm_base.fileio import fsync_path, sha256_file

FORMAT = "tlm-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BATCH_ROWS = 1024


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_schema(row_length: int, dtype: np.dtype, pack: bool) -> pa.Schema:
    fields = [pa.field("input_ids", pa.list_(pa.from_numpy_dtype(dtype), row_length))]
    if not pack:
        fields.append(pa.field("length", pa.int32()))
    return pa.schema(fields, metadata={b"tlm_format": FORMAT.encode(), b"tlm_format_version": str(FORMAT_VERSION).encode()})


class ShardFile:
    """One shard being written: rows go in record batches of BATCH_ROWS; `close()` commits it."""

    def __init__(self, path: Path, schema: pa.Schema, row_length: int, pack: bool, eot: int) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.schema = schema
        self.row_length = row_length
        self.pack = pack
        self.eot = eot
        self.sink = pa.OSFile(str(self.tmp), "wb")
        self.writer = pa.ipc.new_file(self.sink, schema)
        self.pending: list[np.ndarray] = []
        self.pending_lengths: list[np.ndarray] = []
        self.pending_rows = 0
        self.rows = self.tokens = self.documents = 0
        self.max_token_id = 0

    def add(self, rows: np.ndarray, lengths: np.ndarray | None = None) -> None:
        """Append rows (n, row_length); in no-pack mode with their real lengths."""
        self.pending.append(rows)
        if lengths is not None:
            self.pending_lengths.append(lengths)
        self.pending_rows += len(rows)
        self.rows += len(rows)
        if rows.size:
            self.max_token_id = max(self.max_token_id, int(rows.max()))
        if self.pack:
            self.tokens += rows.size
            self.documents += int(np.count_nonzero(rows == self.eot))
        else:
            self.tokens += int(lengths.sum())
            self.documents += len(rows)
        while self.pending_rows >= BATCH_ROWS:
            self._flush(BATCH_ROWS)

    def _flush(self, count: int) -> None:
        rows = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        batch, rest = rows[:count], rows[count:]
        columns = [pa.FixedSizeListArray.from_arrays(pa.array(batch.reshape(-1)), self.row_length)]
        if not self.pack:
            lengths = np.concatenate(self.pending_lengths)
            columns.append(pa.array(lengths[:count].astype(np.int32)))
            self.pending_lengths = [lengths[count:]] if len(lengths) > count else []
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self.pending = [rest] if len(rest) else []
        self.pending_rows = len(rest)

    def close(self) -> dict[str, Any]:
        """Write what is pending, fsync, hash and rename into place; return the shard's manifest entry."""
        if self.pending_rows:
            self._flush(self.pending_rows)
        self.writer.close()
        self.sink.close()
        fsync_path(self.tmp)
        entry = {
            "file": self.path.name,
            "rows": self.rows,
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.tmp.stat().st_size,
            "sha256": sha256_file(self.tmp),
            "max_token_id": self.max_token_id,
        }
        os.replace(self.tmp, self.path)
        return entry

    def abort(self) -> None:
        """Drop the shard being written (also after a close() that a signal or an error cut short)."""
        for close in (self.writer.close, self.sink.close):
            try:
                close()
            except Exception:  # already closed, or the disk is full: the file is deleted either way
                pass
        self.tmp.unlink(missing_ok=True)
