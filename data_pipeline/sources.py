"""Raw text sources: resolve a `--data` spec into sources and stream documents out of them.

Local files (JSONL / JSON / Parquet / CSV / TSV / plain text, optionally .gz / .xz / .zst / .bz2) are read
by streaming readers that know the file and line of every record, so that a bad record is reported as
`file:line: what is wrong`, or counted and skipped (`on_error="skip"`). Hugging Face datasets (a hub name,
streamed, or a folder written by `save_to_disk`) are read through `datasets`.

A document may come in several pieces (a huge text is cut at token-neutral boundaries so that memory
stays bounded); `Document.final` marks its last piece.
"""

from __future__ import annotations

import bz2
import collections
import csv
import glob
import gzip
import io
import json
import lzma
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from data_pipeline.errors import DataError

COMPRESSIONS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd", ".bz2": "bz2"}
FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
    ".csv": "csv", ".tsv": "tsv", ".txt": "text", ".text": "text", ".md": "text",
}
SAMPLE_BY = ("document", "paragraph", "line")
# Pieces of one document are cut near this many characters (see `split_text`).
PIECE_CHARS = 1 << 17
_HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Source:
    """One input: a local file, a saved dataset folder ('disk'), or a hub dataset name ('hf')."""

    kind: str
    path: str
    compression: str | None = None

    @property
    def size(self) -> int | None:
        return os.path.getsize(self.path) if self.kind not in ("hf", "disk") else None

    def content_sha256(self) -> str | None:
        """sha256 of the bytes as stored (every file of a saved dataset folder, with its name); None for a
        hub dataset, which is identified by its name and split only."""
        import hashlib

        if self.kind == "hf":
            return None
        digest = hashlib.sha256()
        files = [Path(self.path)] if self.kind != "disk" else sorted(p for p in Path(self.path).rglob("*") if p.is_file())
        for file in files:
            if self.kind == "disk":
                digest.update(file.relative_to(self.path).as_posix().encode() + b"\0")
            try:
                with open(file, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
            except OSError as e:
                raise DataError(f"{file}: cannot be read ({e.strerror or e})") from None
        return digest.hexdigest()


@dataclass
class Document:
    """A document, or a piece of one. `source` / `record` identify it (record = line or row number)."""

    text: str
    source: int
    record: int
    final: bool = True


@dataclass
class SkipCounter:
    """Counts records skipped under on_error='skip', by reason, with the first few locations."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(where)

    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total(), "by_reason": dict(self.counts), "examples": self.examples}


def _file_source(path: str) -> Source:
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    fmt_suffix = suffixes[-2] if compression and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    kind = FORMATS.get(fmt_suffix)
    if kind is None:
        raise DataError(f"{path}: unknown file type '{''.join(p.suffixes) or '(none)'}'; tlm reads "
                        f"{', '.join(sorted(FORMATS))} files, optionally compressed ({', '.join(COMPRESSIONS)})")
    if kind == "parquet" and compression:
        raise DataError(f"{path}: compressed Parquet is not read; Parquet compresses its columns itself")
    return Source(kind, str(p), compression)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _readable(path: Path) -> bool:
    try:
        _file_source(str(path))
        return not path.name.startswith(".")
    except DataError:
        return False


HF_PREFIX = "hf:"


def resolve_sources(spec: str | list[str] | tuple[str, ...]) -> list[Source]:
    """Turn files, folders (searched recursively), globs and dataset names into an ordered source list.
    `hf:NAME` streams NAME through `datasets.load_dataset(NAME, streaming=True)` (a hub name, or a local folder
    of Parquet / JSON files); ORG/NAME that is not a local path means the same."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise DataError("no data source given")
    sources: list[Source] = []
    for item in items:
        item = str(item)
        if item.startswith(HF_PREFIX):  # streamed through `datasets`, as a hub name is (also a local folder/file)
            sources.append(Source("hf", item[len(HF_PREFIX):]))
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            if _is_saved_dataset(path):
                sources.append(Source("disk", str(path)))
                continue
            files = sorted(p for p in path.rglob("*") if p.is_file() and _readable(p))
            if not files:
                raise DataError(f"folder '{item}' holds no readable files (looked for {', '.join(sorted(FORMATS))}, "
                                f"optionally {', '.join(COMPRESSIONS)})")
            sources.extend(_file_source(str(f)) for f in files)
        elif path.is_file():
            sources.append(_file_source(str(path)))
        elif path.exists():
            raise DataError(f"data source '{item}' is not a regular file or folder ({_file_kind(path)}); "
                            "tlm reads files it can hash and read again: copy the data to a file")
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(os.path.expanduser(item), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"no file matches '{item}'")
            sources.extend(_file_source(m) for m in matches)
        elif _HF_NAME.match(item) and not Path(item).suffix.lower() in {**FORMATS, **COMPRESSIONS}:
            sources.append(Source("hf", item))
        else:
            raise DataError(f"data source '{item}' does not exist")
    _warn_twice_read(sources)
    return sources


def _warn_twice_read(sources: list[Source]) -> None:
    """A file next to its compressed copy (x.txt and x.txt.xz) is read twice: say so (both are kept)."""
    import logging

    plain: dict[str, list[str]] = {}
    for source in sources:
        if source.kind in ("hf", "disk"):
            continue
        name = source.path[: -len(Path(source.path).suffix)] if source.compression else source.path
        plain.setdefault(name, []).append(source.path)
    for paths in plain.values():
        if len(paths) > 1:
            logging.getLogger("tlm").warning("%s are both read: the same text, compressed and not? Remove one to "
                                             "read it once", " and ".join(paths))


def _file_kind(path: Path) -> str:
    import stat

    mode = path.stat().st_mode
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_binary(source: Source) -> IO[bytes]:
    """The file's decompressed bytes, as a stream."""
    if source.compression == "gzip":
        return gzip.open(source.path, "rb")
    if source.compression == "xz":
        return lzma.open(source.path, "rb")
    if source.compression == "bz2":
        return bz2.open(source.path, "rb")
    if source.compression == "zstd":
        return _ZstdReader(source.path)
    return open(source.path, "rb")


class _ZstdReader(io.RawIOBase):
    """zstd frames, one after another, as a stream that raises EOFError when the file ends inside a frame
    (zstandard's own stream reader returns a truncated file's data, or nothing, without a word)."""

    def __init__(self, path: str, chunk: int = 1 << 20) -> None:
        import zstandard

        self._zstd = zstandard
        self._file = open(path, "rb")
        self._chunk = chunk
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._buffer, self._offset = b"", 0
        self._in_frame = False  # input consumed since the last complete frame
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while self._offset >= len(self._buffer) and not self._done:
            data = self._file.read(self._chunk)
            if not data:
                if self._in_frame:
                    raise EOFError("the zstd stream ends inside a frame: the file is truncated")
                self._done = True
                break
            self._buffer, self._offset = b"", 0
            while data:
                self._in_frame = True
                self._buffer += self._dobj.decompress(data)
                data = b""
                if self._dobj.eof:  # a frame ended: what follows is the next frame
                    data = self._dobj.unused_data
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
        n = min(len(target), len(self._buffer) - self._offset)
        target[:n] = self._buffer[self._offset:self._offset + n]
        self._offset += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


_DECOMPRESSION_ERRORS: tuple[type[BaseException], ...] = (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError,
                                                          zlib.error)


def _lines(source: Source) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) pairs; corrupt or truncated compressed data becomes a DataError."""
    lineno = 0
    try:
        with open_binary(source) as f:
            for lineno, line in enumerate(io.BufferedReader(f, 1 << 20) if source.compression == "zstd" else f, 1):
                yield lineno, line
    except _DECOMPRESSION_ERRORS as e:
        raise DataError(f"{source.path}: corrupt or truncated {source.compression or 'file'} data after line "
                        f"{lineno} ({type(e).__name__}: {e})") from None
    except Exception as e:  # zstandard raises its own ZstdError
        if type(e).__name__ == "ZstdError":
            raise DataError(f"{source.path}: corrupt or truncated zstd data after line {lineno} ({e})") from None
        raise


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def _text_of(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a '{text_field}' field, got {type(record).__name__}")
    if text_field not in record:
        fields = ", ".join(list(record)[:10]) or "none"
        raise DataError(f"{where}: no field '{text_field}' (fields: {fields}); choose one with --text-field")
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{text_field}' is {type(value).__name__}, not a string")
    return value


class DocumentReader:
    """Streams the documents of a list of sources, applying the error policy."""

    def __init__(
        self,
        sources: list[Source],
        text_field: str = "text",
        sample_by: str = "document",
        on_error: str = "raise",
        hf_split: str = "train",
        piece_chars: int = PIECE_CHARS,
        hf_config: str | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if sample_by not in SAMPLE_BY:
            raise DataError(f"sample_by must be one of {SAMPLE_BY}, got {sample_by!r}")
        self.sources = sources
        self.text_field = text_field
        self.sample_by = sample_by
        self.on_error = on_error
        self.hf_split = hf_split
        self.piece_chars = piece_chars
        self.hf_config = hf_config
        self.skips = SkipCounter()
        self.documents_per_source = [0] * len(sources)

    @property
    def documents_read(self) -> int:
        """Documents read so far, over every source."""
        return sum(self.documents_per_source)

    def _fail(self, error: DataError, reason: str) -> None:
        """Raise under on_error='raise'; count under 'skip'."""
        if self.on_error == "raise":
            raise error
        self.skips.add(reason, str(error))

    def documents(self, source_indices: list[int] | None = None) -> Iterator[Document]:
        """Documents (or pieces) of the chosen sources, in order; empty texts are skipped and counted."""
        for index in source_indices if source_indices is not None else range(len(self.sources)):
            source = self.sources[index]
            readers = {"jsonl": self._jsonl, "json": self._json, "parquet": self._parquet, "csv": self._csv,
                       "tsv": self._csv, "text": self._text, "hf": self._datasets, "disk": self._datasets}
            count = self.documents_per_source[index] = 0
            try:
                for record, text, final in readers[source.kind](source):
                    if not text:
                        self.skips.add("empty_text", f"{source.path}:{record}")
                        continue
                    count += final
                    self.documents_per_source[index] = count  # kept current: a consumer may stop early
                    pieces = split_text(text, self.piece_chars)
                    for i, piece in enumerate(pieces):
                        yield Document(piece, index, record, final=final and i == len(pieces) - 1)
            except DataError as e:
                self._fail(e, _reason(e, default="unreadable_file"))
            else:
                if count == 0 and source.kind not in ("hf", "disk"):
                    self._fail(DataError(f"{source.path}: no documents (the file is empty or every record was skipped)"),
                               "empty_file")
            self.documents_per_source[index] = count

    # --- readers: each yields (record number, text, final); final=False marks a piece of a document --

    def _jsonl(self, source: Source) -> Iterator[tuple[int, str, bool]]:
        for lineno, raw in _lines(source):
            if not raw.strip():
                continue
            where = f"{source.path}:{lineno}"
            try:
                line = _decode(raw, where)
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise DataError(f"{where}: invalid JSON ({str(e)[:200]})") from None
                yield lineno, _text_of(record, self.text_field, where), True
            except DataError as e:
                self._fail(e, _reason(e))

    def _json(self, source: Source) -> Iterator[tuple[int, str, bool]]:
        with open_binary(source) as f:
            head = f.read(1 << 16).lstrip()
        if not head.startswith(b"["):  # many .json files are JSON Lines
            yield from self._jsonl(source)
            return
        # A JSON array has to be parsed whole; prefer JSON Lines for large corpora.
        try:
            with open_binary(source) as f:
                data = json.loads(_decode(f.read(), source.path))
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{source.path}: invalid JSON ({str(e)[:200]})") from None
        for i, record in enumerate(data):
            try:
                yield i, _text_of(record, self.text_field, f"{source.path}: item {i}"), True
            except DataError as e:
                self._fail(e, _reason(e))

    def _parquet(self, source: Source) -> Iterator[tuple[int, str, bool]]:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(source.path)
        except Exception as e:
            raise DataError(f"{source.path}: not a readable Parquet file ({e})") from None
        names = parquet.schema_arrow.names
        if self.text_field not in names:
            raise DataError(f"{source.path}: no column '{self.text_field}' (columns: {', '.join(names)}); "
                            "choose one with --text-field")
        row = 0
        for batch in parquet.iter_batches(columns=[self.text_field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                where = f"{source.path}: row {row}"
                if isinstance(value, str):
                    yield row, value, True
                else:
                    self._fail(DataError(f"{where}: column '{self.text_field}' is {type(value).__name__}, not a string"),
                               "not_a_string")
                row += 1

    def _csv(self, source: Source) -> Iterator[tuple[int, str, bool]]:
        csv.field_size_limit(1 << 30)
        with open_binary(source) as raw:
            stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
            reader = csv.DictReader(stream, delimiter="\t" if source.kind == "tsv" else ",")
            try:
                if reader.fieldnames is None:
                    return
                if self.text_field not in reader.fieldnames:
                    raise DataError(f"{source.path}: no column '{self.text_field}' (columns: "
                                    f"{', '.join(reader.fieldnames)}); choose one with --text-field")
                for record in reader:
                    value = record.get(self.text_field)
                    if value is None:
                        self._fail(DataError(f"{source.path}:{reader.line_num}: row has no '{self.text_field}' value"),
                                   "missing_field")
                        continue
                    yield reader.line_num, value, True
            except UnicodeDecodeError as e:
                raise DataError(f"{source.path}: not UTF-8 near line {reader.line_num + 1} ({e.reason})") from None
            except csv.Error as e:
                raise DataError(f"{source.path}:{reader.line_num}: malformed CSV ({e})") from None

    def _text(self, source: Source) -> Iterator[tuple[int, str, bool]]:
        lines: list[str] = []  # the document or paragraph being gathered
        size, start, pending = 0, 1, None
        for lineno, raw in _lines(source):
            try:
                line = _decode(raw, f"{source.path}:{lineno}")
            except DataError as e:
                self._fail(e, "not_utf8")
                continue
            if self.sample_by == "line":
                if line.strip():
                    yield lineno, line.rstrip("\r\n"), True
            elif self.sample_by == "paragraph":
                if line.strip():
                    start = lineno if not lines else start
                    lines.append(line)
                elif lines:
                    yield start, "".join(lines).rstrip("\r\n"), True
                    lines = []
            else:
                # Whole file = one document, handed on in pieces of ~piece_chars cut before a line that
                # starts with non-space after a line that ends with non-space (see split_text).
                if size >= self.piece_chars and line[:1].strip() and lines[-1].endswith("\n") and lines[-1][-2:-1].strip():
                    if pending is not None:
                        yield 1, pending, False
                    pending, lines, size = "".join(lines), [], 0
                lines.append(line)
                size += len(line)
        if self.sample_by == "paragraph" and lines:
            yield start, "".join(lines).rstrip("\r\n"), True
        if self.sample_by == "document":
            rest = "".join(lines)
            if pending is not None:
                yield 1, pending, not rest
            if rest:
                yield 1, rest, True

    def _datasets(self, source: Source) -> Iterator[tuple[int, str, bool]]:
        import datasets

        try:
            if source.kind == "disk":
                data = datasets.load_from_disk(source.path)
                if isinstance(data, datasets.DatasetDict):
                    if self.hf_split not in data:
                        raise DataError(f"{source.path}: no split '{self.hf_split}' (splits: {', '.join(data)})")
                    data = data[self.hf_split]
            else:
                # Streamed: records arrive as they are read, so tokenizing starts at once and a capped run
                # (--max-tokens) never downloads the rest.
                data = datasets.load_dataset(source.path, self.hf_config, split=self.hf_split, streaming=True)
        except DataError:
            raise
        except Exception as e:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
            hint = " (the hub is switched off: HF_HUB_OFFLINE=1; use a local copy)" if offline else ""
            raise DataError(f"dataset '{source.path}' cannot be loaded{hint}: {type(e).__name__}: {str(e)[:300]}") from None
        columns = data.column_names or []
        if columns and self.text_field not in columns:
            raise DataError(f"dataset '{source.path}': no column '{self.text_field}' (columns: {', '.join(columns)}); "
                            "choose one with --text-field")
        for i, record in enumerate(data):
            try:
                yield i, _text_of(record, self.text_field, f"dataset '{source.path}': row {i}"), True
            except DataError as e:
                self._fail(e, _reason(e))


def _reason(error: DataError, default: str = "other") -> str:
    message = str(error)
    for needle, reason in (("corrupt or truncated", "corrupt_file"), ("not UTF-8", "not_utf8"), ("invalid JSON", "invalid_json"), ("no field", "missing_field"),
                           ("not a string", "not_a_string"), ("expected a JSON object", "not_an_object")):
        if needle in message:
            return reason
    return default


_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
_SAFE_SPACE_CUT = re.compile(r"(?<=\S)(?= \S)")


def split_text(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of at most about 1.25 x `piece_chars` characters whose separate tokenization
    equals the tokenization of the whole.

    A byte-level BPE never merges across pre-tokens. The GPT-2 pre-tokenizer always ends a pre-token at a
    newline that has non-space characters on both sides ('x\ny'), and before a single space between two
    non-space characters ('x y': ' y' starts the next one). Cuts go right after such a newline, else right
    before such a space, so piece-wise token ids are exactly the whole text's. Only a stretch of
    `piece_chars` characters with neither (no whitespace at all: binary noise, a minified blob) is cut
    blindly, where one token may differ; memory stays bounded whatever the input.
    """
    if len(text) <= piece_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        window_end = start + piece_chars
        lo, hi = window_end - piece_chars // 4, window_end + piece_chars // 4
        match = _SAFE_CUT.search(text, lo, hi) or _SAFE_SPACE_CUT.search(text, lo, hi)
        cut = match.start() if match else window_end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces
