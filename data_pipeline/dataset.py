"""Reading a prepared dataset: the manifest, its checks, and memory-mapped rows with one global index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipeline.formats import DatasetManifest
from data_pipeline.shards import BATCH_ROWS, FORMAT, FORMAT_VERSION, MANIFEST, shard_schema
from data_pipeline.sources import DataError
from data_pipeline.fileio import sha256_file
from data_pipeline.schema import inside, load_json_text, parse


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
        if (root / ".prepare-journal.jsonl").exists():
            raise DataError(f"'{root}' holds an unfinished `tlm prepare` (no manifest.json yet); rerun it to complete it")
        if list(root.glob("worker-*-of-*")):
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
                        f"prepare it again with --seq-len {seq_len}")


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


class TokenRows:
    """All rows of one split, memory-mapped, addressed by one global row index."""

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
        self._batches: list[list[np.ndarray]] = []  # per shard: per record batch, a (rows, row_length) view
        self._lengths: list[list[np.ndarray]] = []
        starts = [0]
        self.max_token_ids: dict[str, int] = {}
        self.dtype = np.dtype(self.manifest["dtype"])
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
            batches, lengths = self._map(file)
            if sum(len(b) for b in batches) != shard["rows"]:
                raise DataError(f"{file}: holds {sum(len(b) for b in batches)} rows, the manifest says {shard['rows']}; {FIX}")
            self._check_values(file, shard, batches, lengths, verify)
            self._batches.append(batches)
            self._lengths.append(lengths)
            starts.append(starts[-1] + shard["rows"])
        self._starts = np.array(starts, dtype=np.int64)
        self.num_rows = int(starts[-1])
        self.fingerprint = self.manifest["fingerprint"]

    def _map(self, file: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Memory-map a shard after checking its Arrow schema against the manifest (row length, dtype, columns)."""
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(file), "r"))
            expected = shard_schema(self.row_length, self.dtype, self.pack)
            if not reader.schema.remove_metadata().equals(expected.remove_metadata()):
                raise DataError(f"{file}: its Arrow schema ({_schema_text(reader.schema)}) is not the one the manifest "
                                f"describes ({_schema_text(expected)}); the manifest or the shard was edited; {FIX}")
            batches, lengths = [], []
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                ids = batch.column("input_ids")
                values = ids.values.to_numpy(zero_copy_only=True)
                batches.append(values[ids.offset * self.row_length :][: len(ids) * self.row_length].reshape(-1, self.row_length))
                if not self.pack:
                    lengths.append(batch.column("length").to_numpy(zero_copy_only=True))
        except (pa.ArrowInvalid, pa.ArrowException, OSError, KeyError) as e:
            raise DataError(f"{file}: not a readable token shard ({e})") from None
        return batches, lengths

    def _check_values(self, file: Path, shard: dict[str, Any], batches: list[np.ndarray], lengths: list[np.ndarray],
                      verify: str) -> None:
        """The largest token id (scanned under a sha256 check or when the manifest has none; it must equal the
        recorded one) and, in no-pack mode, row lengths within 1..row_length."""
        recorded = shard.get("max_token_id")
        if verify == "sha256" or recorded is None:
            scanned = max((int(b.max()) for b in batches if b.size), default=0)
            if recorded is not None and scanned != recorded:
                raise DataError(f"{file}: its largest token id is {scanned}, the manifest says {recorded}; {FIX}")
            recorded = scanned
        self.max_token_ids[shard["file"]] = recorded
        if lengths and verify != "none":
            low, high = min(int(x.min()) for x in lengths if x.size), max(int(x.max()) for x in lengths if x.size)
            if low < 1 or high > self.row_length:
                raise DataError(f"{file}: row lengths {low}..{high} are outside 1..{self.row_length}; {FIX}")

    def __len__(self) -> int:
        return self.num_rows

    def _locate(self, index: int) -> tuple[int, int, int]:
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} of {self.num_rows}")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        local = index - int(self._starts[shard])
        return shard, local // BATCH_ROWS, local % BATCH_ROWS

    def row(self, index: int) -> np.ndarray:
        shard, batch, offset = self._locate(index)
        return self._batches[shard][batch][offset]

    def length(self, index: int) -> int:
        """Real tokens of a row (all of them in pack mode)."""
        if self.pack:
            return self.row_length
        shard, batch, offset = self._locate(index)
        return int(self._lengths[shard][batch][offset])

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows (len(indices), row_length) as int64, and their lengths in no-pack mode."""
        out = np.empty((len(indices), self.row_length), dtype=np.int64)
        lengths = None if self.pack else np.empty(len(indices), dtype=np.int64)
        for i, index in enumerate(indices.tolist()):
            shard, batch, offset = self._locate(index)
            out[i] = self._batches[shard][batch][offset]
            if lengths is not None:
                lengths[i] = self._lengths[shard][batch][offset]
        return out, lengths
