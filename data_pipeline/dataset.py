"""Reading a prepared dataset: the manifest, its checks, and rows with one global index.

Rows are read with pread(2) from the shard files, not through a memory map: a shard truncated or rewritten
while a run reads it (a prepare --overwrite of another version, a copy over it) is then a short read or a
changed size, reported in one line naming the shard, instead of a SIGBUS that kills the process without a word.
Only the shards' Arrow metadata (schemas, where each record batch lies) is read through a map, once, at open.
The page cache serves the reads as it served the map; each read of a batch costs one system call per row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipeline.formats import DatasetManifest
from data_pipeline.shards import FORMAT, FORMAT_VERSION, MANIFEST, shard_schema
from tlm_base.errors import DataError
from tlm_base.fileio import sha256_file
from tlm_base.schema import inside, load_json_text, parse


def _schema_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


FIX = "prepare the dataset again (tlm prepare ... --overwrite)"


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset folder, validated (see data_pipeline.formats); explains what is
    wrong when there is none."""
    root = Path(path)
    file = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise DataError(f"'{root}' is not a prepared dataset folder (it is a file)")
    if not file.exists():
        partial = root.absolute().with_name(root.absolute().name + ".partial")
        if (partial / ".prepare-journal.jsonl").exists() or (root / ".prepare-journal.jsonl").exists():
            raise DataError(f"'{root}' holds no dataset yet: an unfinished `tlm prepare` is making it in {partial.name}; "
                            "rerun that prepare to complete it")
        if root.is_dir() and list(root.glob("worker-*-of-*")):
            raise DataError(f"'{root}' holds worker outputs but no merged manifest; run `tlm prepare --merge --out {root}`")
        raise DataError(f"'{root}' is not a prepared dataset: {MANIFEST} is missing")
    data = load_json_text(file, DataError, FIX)
    if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("format_version"), int) \
            and not isinstance(data["format_version"], bool) and data["format_version"] > FORMAT_VERSION:
        raise DataError(f"{file}: format_version {data['format_version']} is newer than this tlm reads ({FORMAT_VERSION}); "
                        "upgrade tlm")
    if isinstance(data, dict) and data.get("format") != FORMAT:
        raise DataError(f"{file}: not a tlm token dataset (format {data.get('format')!r})")
    parse(DatasetManifest, data, str(file), DataError, FIX)
    return data


def check_compatible(manifest: dict[str, Any], vocab_size: int, seq_len: int, tokenizer_sha256: str | None = None,
                     where: str = "dataset") -> None:
    """Refuse a dataset whose tokenizer, vocabulary or sequence length disagree with the model and run."""
    tok = manifest["tokenizer"]
    if tok["vocab_size"] > vocab_size:
        raise DataError(f"{where}: its tokenizer has {tok['vocab_size']} tokens but the model's vocab_size is {vocab_size}")
    if tokenizer_sha256 is not None and tok["sha256"] != tokenizer_sha256:
        raise DataError(f"{where}: tokenized with another tokenizer (sha256 {tok['sha256'][:12]}...) than the model's "
                        f"({tokenizer_sha256[:12]}...); prepare it again with the model's tokenizer")
    if manifest["seq_len"] != seq_len:
        raise DataError(f"{where}: prepared for seq_len {manifest['seq_len']}, the run uses {seq_len}; "
                        f"prepare it again with --seq_len {seq_len}")


def check_token_range(rows: "TokenRows", vocab_size: int) -> None:
    """Refuse rows holding a token id the model (or the dataset's own tokenizer) has no embedding for,
    naming the shard: an id past the embedding is an IndexError on CPU and a device-side assert on a GPU."""
    tokenizer_vocab = rows.manifest["tokenizer"]["vocab_size"]
    for file, largest in rows.max_token_ids.items():
        if largest >= tokenizer_vocab:
            raise DataError(f"{rows.root / file}: holds token id {largest}, outside its tokenizer's vocabulary of "
                            f"{tokenizer_vocab}: the shard was not written by that tokenizer; {FIX}")
        if largest >= vocab_size:
            raise DataError(f"{rows.root / file}: holds token id {largest}, but the model's vocabulary has {vocab_size} "
                            f"ids (0..{vocab_size - 1}); prepare the data with the model's tokenizer or raise model.vocab_size")


class _Shard:
    """One shard, open for pread: where its record batches' rows lie in the file, its size when checked."""

    def __init__(self, file: Path, row_bytes: int, offsets: list[int], counts: list[int]) -> None:
        self.file = file
        self.row_bytes = row_bytes
        self.fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.size = os.fstat(self.fd).st_size
        self.offsets = np.array(offsets, dtype=np.int64)  # file offset of each record batch's first row
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first row of each batch

    def changed(self) -> str | None:
        """How the file changed since it was checked (its size), or None."""
        size = os.fstat(self.fd).st_size
        return None if size == self.size else f"{self.size} bytes when checked, {size} now"

    def where(self, local: int) -> int:
        batch = int(np.searchsorted(self.starts, local, side="right")) - 1
        return int(self.offsets[batch]) + (local - int(self.starts[batch])) * self.row_bytes

    def read_into(self, target: np.ndarray, offset: int) -> None:
        """Fill `target` (C-contiguous) from the file at `offset`; a short read is a shard cut under the run."""
        view = memoryview(target).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        if done != len(view):
            raise DataError(f"{self.file}: changed while this process read it (a row at byte {offset} lies past its "
                            f"end: {self.changed() or 'its size is unchanged'}): {CHANGED}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


CHANGED = ("a shard must not be truncated or rewritten while a run reads its folder (a `tlm prepare --overwrite` "
           "replaces the folder whole instead); rerun once it is settled (training resumes from its last checkpoint)")


class TokenRows:
    """All rows of one split, read from the shards on demand, addressed by one global row index."""

    def __init__(self, path: str | Path, split: str = "train", verify: str = "sha256") -> None:
        if verify not in ("sha256", "size", "none"):
            raise ValueError(f"verify must be sha256, size or none, got {verify!r}")
        self.root = Path(path)
        self.manifest = load_manifest(self.root)
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.root}: no split '{split}' (splits: {', '.join(self.manifest['splits'])})")
        info = self.manifest["splits"][split]
        self.split = split
        self.row_length = self.manifest["row_length"]
        self.seq_len = self.manifest["seq_len"]
        self.pack = self.manifest["mode"] == "pack"
        self.pad_token_id = self.manifest["tokenizer"]["pad_token_id"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.row_bytes = self.row_length * self.dtype.itemsize
        self._shards: list[_Shard] = []
        self._lengths: list[np.ndarray] = []  # no-pack: each shard's row lengths, in memory (4 bytes a row)
        starts = [0]
        self.max_token_ids: dict[str, int] = {}
        try:
            for shard in info["shards"]:
                try:
                    file = inside(self.root, shard["file"])
                except ValueError as e:
                    raise DataError(f"{self.root / MANIFEST}: shard {e}; {FIX}") from None
                if not file.is_file():
                    raise DataError(f"{self.root}: shard {shard['file']} named in the manifest is missing; {FIX}")
                if verify != "none" and file.stat().st_size != shard["bytes"]:
                    raise DataError(f"{file}: {file.stat().st_size} bytes, the manifest says {shard['bytes']}: "
                                    f"the shard is truncated or was replaced; {FIX}")
                if verify == "sha256" and sha256_file(file) != shard["sha256"]:
                    raise DataError(f"{file}: sha256 differs from the manifest: the shard is corrupt or was modified; {FIX}")
                opened, lengths_at = self._open(file)
                self._shards.append(opened)
                if int(opened.starts[-1]) != shard["rows"]:
                    raise DataError(f"{file}: holds {int(opened.starts[-1])} rows, the manifest says {shard['rows']}; {FIX}")
                lengths = np.empty(0, dtype=np.int32)
                if not self.pack:
                    lengths = np.empty(shard["rows"], dtype=np.int32)
                    for (offset, count), start in zip(lengths_at, opened.starts[:-1].tolist()):
                        opened.read_into(lengths[start:start + count], offset)
                self._lengths.append(lengths)
                self._check_values(opened, shard, lengths, verify)
                starts.append(starts[-1] + shard["rows"])
        except BaseException:
            self.close()
            raise
        self._starts = np.array(starts, dtype=np.int64)
        self.num_rows = int(starts[-1])
        self.fingerprint = self.manifest["fingerprint"]

    def _open(self, file: Path) -> tuple[_Shard, list[tuple[int, int]]]:
        """Check a shard's Arrow schema against the manifest (row length, dtype, columns) and find where its rows
        (and no-pack row lengths) lie in the file: the metadata is read through a map, the rows never are."""
        try:
            source = pa.memory_map(str(file), "r")
            try:
                whole = source.read_buffer()
                base, size = whole.address, whole.size
                reader = pa.ipc.open_file(whole)
                expected = shard_schema(self.row_length, self.dtype, self.pack)
                if not reader.schema.remove_metadata().equals(expected.remove_metadata()):
                    raise DataError(f"{file}: its Arrow schema ({_schema_text(reader.schema)}) is not the one the manifest "
                                    f"describes ({_schema_text(expected)}); the manifest or the shard was edited; {FIX}")
                offsets, counts, lengths_at = [], [], []
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)
                    ids = batch.column("input_ids")
                    values = ids.values
                    data = values.buffers()[1]
                    if ids.null_count or values.null_count or data is None:
                        raise DataError(f"{file}: record batch {i} holds missing values; {FIX}")
                    offset = data.address - base + (values.offset + ids.offset * self.row_length) * self.dtype.itemsize
                    if not 0 <= offset <= offset + len(ids) * self.row_bytes <= size:
                        raise DataError(f"{file}: record batch {i} is not stored plainly in the file (compressed?); {FIX}")
                    offsets.append(offset)
                    counts.append(len(ids))
                    if not self.pack:
                        column = batch.column("length")
                        where = column.buffers()[1].address - base + column.offset * 4
                        if column.null_count or not 0 <= where <= where + len(column) * 4 <= size:
                            raise DataError(f"{file}: record batch {i}'s lengths are not stored plainly in the file; {FIX}")
                        lengths_at.append((where, len(column)))
            finally:
                source.close()
        except (pa.ArrowInvalid, pa.ArrowException, OSError, KeyError) as e:
            raise DataError(f"{file}: not a readable token shard ({e})") from None
        return _Shard(file, self.row_bytes, offsets, counts), lengths_at

    def _check_values(self, shard: _Shard, entry: dict[str, Any], lengths: np.ndarray, verify: str) -> None:
        """The largest token id (scanned under a sha256 check or when the manifest has none; it must equal the
        recorded one) and, in no-pack mode, row lengths within 1..row_length."""
        recorded = entry.get("max_token_id")
        if verify == "sha256" or recorded is None:
            scanned = 0
            for b in range(len(shard.offsets)):
                rows = np.empty((int(shard.starts[b + 1] - shard.starts[b]), self.row_length), dtype=self.dtype)
                shard.read_into(rows, int(shard.offsets[b]))
                if rows.size:
                    scanned = max(scanned, int(rows.max()))
            if recorded is not None and scanned != recorded:
                raise DataError(f"{shard.file}: its largest token id is {scanned}, the manifest says {recorded}; {FIX}")
            recorded = scanned
        self.max_token_ids[entry["file"]] = recorded
        if lengths.size and verify != "none":
            low, high = int(lengths.min()), int(lengths.max())
            if low < 1 or high > self.row_length:
                raise DataError(f"{shard.file}: row lengths {low}..{high} are outside 1..{self.row_length}; {FIX}")

    def __len__(self) -> int:
        return self.num_rows

    def close(self) -> None:
        """Close the shard files (also done when the rows are garbage-collected)."""
        for shard in getattr(self, "_shards", []):
            shard.close()

    def __del__(self) -> None:
        self.close()

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} of {self.num_rows}")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def row(self, index: int) -> np.ndarray:
        shard, local = self._locate(index)
        out = np.empty(self.row_length, dtype=self.dtype)
        self._shards[shard].read_into(out, self._shards[shard].where(local))
        return out

    def length(self, index: int) -> int:
        """Real tokens of a row (all of them in pack mode)."""
        if self.pack:
            return self.row_length
        shard, local = self._locate(index)
        return int(self._lengths[shard][local])

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows (len(indices), row_length) as int64, and their lengths in no-pack mode. A shard that changed size
        since it was checked, or that ends before a row, is one error naming it (see the module docstring)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise IndexError(f"row {int(indices.max() if indices.max() >= self.num_rows else indices.min())} of "
                             f"{self.num_rows}")
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        local = indices - self._starts[shards]
        offsets = np.empty(len(indices), dtype=np.int64)
        lengths = None if self.pack else np.empty(len(indices), dtype=np.int64)
        used = np.unique(shards).tolist()
        for s in used:
            mine = shards == s
            shard = self._shards[s]
            batch = np.searchsorted(shard.starts, local[mine], side="right") - 1
            offsets[mine] = shard.offsets[batch] + (local[mine] - shard.starts[batch]) * self.row_bytes
            if lengths is not None:
                lengths[mine] = self._lengths[s][local[mine]]
        raw = np.empty((len(indices), self.row_length), dtype=self.dtype)
        view, size = memoryview(raw).cast("B"), self.row_bytes
        fds = [self._shards[s].fd for s in shards.tolist()]
        for i, (fd, offset) in enumerate(zip(fds, offsets.tolist())):
            if os.preadv(fd, [view[i * size:(i + 1) * size]], offset) != size:  # short: re-read to say why
                self._shards[int(shards[i])].read_into(raw[i], offset)
        for s in used:
            change = self._shards[s].changed()
            if change:
                raise DataError(f"{self._shards[s].file}: changed while this process read it ({change}): {CHANGED}")
        return raw.astype(np.int64), lengths
