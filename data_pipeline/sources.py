"""Raw text sources: resolve a `--data` spec into sources and stream documents out of them.

Local files (JSONL / JSON / Parquet / CSV / TSV / plain text, optionally .gz / .xz / .zst / .bz2) are read
by streaming readers that know the file and line of every record, so that a bad record is reported as
`file:line: what is wrong`, or counted and skipped (`on_error="skip"`). Hugging Face datasets (a hub name,
streamed, or a folder written by `save_to_disk`) are read through `datasets`.

A document may come in several pieces (a huge text is cut at token-neutral boundaries so that memory
stays bounded); `Document.final` marks its last piece.

Every size is bounded, so memory stays flat whatever the input (a decompression bomb included): text files are
streamed in chunks of READ_CHUNK bytes and cut into pieces as they are read, never held whole; a line that must
be parsed whole (a JSON Lines record, a CSV row, a JSON array file) may hold at most `max_line_mb` MiB; a
document at most `max_document_mb` MiB of characters. Past a bound the record is refused in one line naming
the file, the line, the bound and the flag that raises it (or, with on_error="skip", skipped and counted).

With `expected_sha256` (what `prepare` fingerprinted), the bytes of every local file are hashed as they are
read and compared when the file ends: a source that changed while it was read is refused (`SourceChanged`),
never tokenized as a mix of two versions under the first one's fingerprint.
"""

from __future__ import annotations

import bz2
import collections
import codecs
import contextlib
import csv
import glob
import gzip
import hashlib
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

from tlm_base.errors import DataError
from tlm_base.fileio import file_kind

COMPRESSIONS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd", ".bz2": "bz2"}
FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
    ".csv": "csv", ".tsv": "tsv", ".txt": "text", ".text": "text", ".md": "text",
}
SAMPLE_BY = ("document", "paragraph", "line")
# Pieces of one document are cut near this many characters (see `split_text`).
PIECE_CHARS = 1 << 17
# The bounds on input sizes (prepare's --max_line_mb and --max_document_mb raise them).
MAX_LINE_MB = 128  # a line held whole to be parsed: a JSON Lines record, a CSV row, a whole JSON array file
MAX_DOCUMENT_MB = 1024  # one document, in MiB of characters (2**20 characters per MiB)
READ_CHUNK = 1 << 20  # text files are read at most this many bytes at a time
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


class SourceChanged(DataError):
    """A source's bytes as read differ from those fingerprinted when prepare started: it changed while read."""


class _Tap:
    """The sha256 and count of a file's bytes as they are read (before decompression)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.bytes = 0
        self.eof = False

    def position(self) -> tuple[int, str]:
        """(bytes read so far, their sha256)."""
        return self.bytes, self.digest.copy().hexdigest()


class _TappedFile(io.RawIOBase):
    """A file whose bytes go through a `_Tap` as they are read."""

    def __init__(self, path: str, tap: _Tap) -> None:
        self._file = open(path, "rb", buffering=0)
        self._tap = tap

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        n = self._file.readinto(target)
        if n:
            self._tap.digest.update(memoryview(target)[:n])
            self._tap.bytes += n
        elif n == 0 and len(target):
            self._tap.eof = True
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


@contextlib.contextmanager
def _opened(source: Source, tap: _Tap | None) -> Iterator[IO[bytes]]:
    """`open_binary`, with the file's bytes going through `tap` when given (and closed with the stream)."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(io.BufferedReader(_TappedFile(source.path, tap), READ_CHUNK)) if tap is not None else None
        yield stack.enter_context(open_binary(source, raw))


def sha256_prefix(path: str, size: int) -> str:
    """sha256 of the first `size` bytes of a file (fewer when it is shorter)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while size > 0 and (block := f.read(min(size, 1 << 22))):
            digest.update(block)
            size -= len(block)
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
            raise DataError(f"data source '{item}' is not a regular file or folder ({file_kind(path)}); "
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


def open_binary(source: Source, raw: IO[bytes] | None = None) -> IO[bytes]:
    """The file's decompressed bytes, as a stream (read from `raw`, the file already open, when given: the caller
    closes it)."""
    if source.compression == "gzip":
        return gzip.open(raw if raw is not None else source.path, "rb")
    if source.compression == "xz":
        return lzma.open(raw if raw is not None else source.path, "rb")
    if source.compression == "bz2":
        return bz2.open(raw if raw is not None else source.path, "rb")
    if source.compression == "zstd":
        return io.BufferedReader(_ZstdReader(raw if raw is not None else open(source.path, "rb")), READ_CHUNK)
    return raw if raw is not None else open(source.path, "rb")


class _ZstdReader(io.RawIOBase):
    """zstd frames, one after another, as a stream that raises EOFError when the file ends inside a frame
    (zstandard's own stream reader returns a truncated file's data, or nothing, without a word)."""

    def __init__(self, file: IO[bytes], chunk: int = 1 << 20) -> None:
        import zstandard

        self._zstd = zstandard
        self._file = file
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


def _decompression_error(source: Source, lineno: int, e: BaseException) -> DataError | None:
    """The one line for corrupt or truncated compressed data (None: not such an error)."""
    if isinstance(e, _DECOMPRESSION_ERRORS):
        return DataError(f"{source.path}: corrupt or truncated {source.compression or 'file'} data after line "
                         f"{lineno} ({type(e).__name__}: {e})")
    if type(e).__name__ == "ZstdError":  # zstandard raises its own ZstdError
        return DataError(f"{source.path}: corrupt or truncated zstd data after line {lineno} ({e})")
    return None


def _mb(size: int) -> str:
    return f"{size / 2**20:g} MiB"


def _where(source: Source, record: int) -> str:
    """A record's place for a message: file:LINE for line formats, the row or item otherwise."""
    if source.kind in ("jsonl", "csv", "tsv", "text"):
        return f"{source.path}:{record}"
    if source.kind == "json":
        return f"{source.path}: record {record}"
    return f"{source.path}: row {record}" if source.kind != "hf" else f"dataset '{source.path}': row {record}"


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
    """Streams the documents of a list of sources, applying the error policy and the size bounds.

    `max_line_mb`: the most a line that must be parsed whole may hold (a JSON Lines record, a CSV row, a whole
    JSON array file); `max_document_mb`: the most characters (in units of 2**20) one document may hold.
    `expected_sha256`: per source, the sha256 its bytes must have (what the caller fingerprinted); each local
    file is then hashed as it is read and a difference is refused when the file ends (`SourceChanged`).
    """

    def __init__(
        self,
        sources: list[Source],
        text_field: str = "text",
        sample_by: str = "document",
        on_error: str = "raise",
        hf_split: str = "train",
        piece_chars: int = PIECE_CHARS,
        hf_config: str | None = None,
        max_line_mb: float = MAX_LINE_MB,
        max_document_mb: float = MAX_DOCUMENT_MB,
        expected_sha256: list[str | None] | None = None,
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
        self.max_line_bytes = max(1, int(max_line_mb * 2**20))
        self.max_document_chars = max(1, int(max_document_mb * 2**20))
        self.expected_sha256 = expected_sha256
        self.skips = SkipCounter()
        self.documents_per_source = [0] * len(sources)
        self._tap: _Tap | None = None
        self._reading: int | None = None  # the source being read and not yet checked against its sha256

    @property
    def documents_read(self) -> int:
        """Documents read so far, over every source."""
        return sum(self.documents_per_source)

    def _fail(self, error: DataError, reason: str) -> None:
        """Raise under on_error='raise'; count under 'skip'."""
        if self.on_error == "raise":
            raise error
        self.skips.add(reason, str(error))

    def read_position(self) -> dict[str, Any] | None:
        """Where reading is: the source being read, the bytes of its file read so far and their sha256 (None when
        that is not known: between sources, or a source read by random access or through `datasets`)."""
        if self._reading is None or self._tap is None:
            return None
        size, digest = self._tap.position()
        return {"source": self._reading, "bytes": size, "sha256": digest}

    def finish(self) -> None:
        """Check the source whose reading stopped early (a consumer that stopped, e.g. at --max-tokens) against
        its sha256: the rest of its file is hashed without being read as text."""
        if self._reading is not None:
            self._check_source(self._reading, self._tap)

    def _check_source(self, index: int, tap: _Tap | None) -> None:
        """Raise SourceChanged when the source's bytes as read are not those fingerprinted."""
        self._reading = None
        change = self._change(index, tap)
        if change:
            raise SourceChanged(change)

    def _change(self, index: int, tap: _Tap | None) -> str | None:
        expected = self.expected_sha256[index] if self.expected_sha256 else None
        if not expected:
            return None
        source = self.sources[index]
        try:
            if tap is None:  # read by random access (Parquet, a saved dataset): hash it again after reading
                actual = source.content_sha256()
            else:
                digest = tap.digest.copy()
                if not tap.eof:  # reading stopped early: hash the rest of the file
                    with open(source.path, "rb") as f:
                        f.seek(tap.bytes)
                        while block := f.read(1 << 22):
                            digest.update(block)
                actual = digest.hexdigest()
        except (OSError, DataError) as e:
            actual = f"unreadable ({getattr(e, 'strerror', None) or e})"
        if actual == expected:
            return None
        return (f"{source.path} changed while prepare read it (sha256 {expected[:12]}... when prepare started, "
                f"{actual[:12]}... of the bytes read): the text read would mix two versions, so none of it is kept; "
                "rerun once nothing writes to the file")

    def documents(self, source_indices: list[int] | None = None) -> Iterator[Document]:
        """Documents (or pieces) of the chosen sources, in order; empty texts are skipped and counted."""
        for index in source_indices if source_indices is not None else range(len(self.sources)):
            source = self.sources[index]
            readers = {"jsonl": self._jsonl, "json": self._json, "parquet": self._parquet, "csv": self._csv,
                       "tsv": self._csv, "text": self._text, "hf": self._datasets, "disk": self._datasets}
            checked = bool(self.expected_sha256 and self.expected_sha256[index])
            tap = _Tap() if checked and source.kind not in ("hf", "disk", "parquet") else None
            self._tap, self._reading = tap, index if checked else None
            count = self.documents_per_source[index] = 0
            pieces: _Pieces | None = None  # the document being handed on
            start = chars = 0
            try:
                dropping = False  # skipping the rest of a document past the bound
                for record, text, final in readers[source.kind](source):
                    if dropping:
                        dropping = not final
                        continue
                    if pieces is None:
                        pieces, start, chars = _Pieces(self.piece_chars), record, 0
                    chars += len(text)
                    if chars > self.max_document_chars:
                        hint = (" (or cut the text: --sample_by paragraph or line)"
                                if source.kind == "text" and self.sample_by == "document" else "")
                        self._fail(DataError(
                            f"{_where(source, start)}: document {count + 1} of the file is longer than "
                            f"{_mb(self.max_document_chars)} of text, the bound on one document; raise it with "
                            f"--max_document_mb N{hint}"), "document_too_long")
                        text = text[: len(text) - (chars - self.max_document_chars)]  # skip: keep what fits, cut there
                        chars = self.max_document_chars
                        dropping, final = not final, True
                    ready = pieces.add(text)
                    if final:
                        ready += pieces.end()
                        pieces = None
                        if chars == 0:
                            self.skips.add("empty_text", f"{source.path}:{start}")
                            continue
                        count += 1
                        self.documents_per_source[index] = count  # kept current: a consumer may stop early
                    for i, piece in enumerate(ready):
                        yield Document(piece, index, start, final=final and i == len(ready) - 1)
            except DataError as e:
                change = self._change(index, tap) if checked else None
                if change:  # a record broken by a write under the reader: the write is the cause to report
                    self._reading = None
                    raise SourceChanged(change) from None
                self._fail(e, _reason(e, default="unreadable_file"))
                if pieces is not None and chars:  # skipped: a document cut short by the error ends where it was cut
                    ready = pieces.end()
                    count += 1
                    self.documents_per_source[index] = count
                    for i, piece in enumerate(ready):
                        yield Document(piece, index, start, final=i == len(ready) - 1)
            else:
                if count == 0 and source.kind not in ("hf", "disk"):
                    self._fail(DataError(f"{source.path}: no documents (the file is empty or every record was skipped)"),
                               "empty_file")
            self.documents_per_source[index] = count
            if checked:
                self._check_source(index, tap)  # never skipped: a changing file is not a bad record

    # --- readers: each yields (record number, text, final); final=False: more text of the document follows --

    def _lines(self, source: Source) -> Iterator[tuple[int, bytes]]:
        """(line number, raw line) pairs, each at most `max_line_bytes` long (a longer one is refused, or skipped
        unread under on_error='skip'); corrupt or truncated compressed data becomes a DataError."""
        lineno = 0
        try:
            with _opened(source, self._tap) as f:
                while line := f.readline(self.max_line_bytes + 1):
                    lineno += 1
                    if len(line) > self.max_line_bytes and not (len(line) == self.max_line_bytes + 1 and line.endswith(b"\n")):
                        self._fail(DataError(f"{source.path}:{lineno}: a line longer than {_mb(self.max_line_bytes)}, the "
                                             "bound on a line that is parsed whole; raise it with --max_line_mb N"),
                                   "line_too_long")
                        while not line.endswith(b"\n") and (line := f.readline(READ_CHUNK)):
                            pass  # skipped: the rest of the line is read in bounded chunks and dropped
                        continue
                    yield lineno, line
        except DataError:
            raise
        except Exception as e:
            raise _decompression_error(source, lineno, e) or e

    def _jsonl(self, source: Source) -> Iterator[tuple[int, str, bool]]:
        for lineno, raw in self._lines(source):
            if not raw.strip():
                continue
            where = f"{source.path}:{lineno}"
            try:
                line = _decode(raw, where)
                del raw
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise DataError(f"{where}: invalid JSON ({str(e)[:200]})") from None
                del line
                yield lineno, _text_of(record, self.text_field, where), True
            except DataError as e:
                self._fail(e, _reason(e))

    def _json(self, source: Source) -> Iterator[tuple[int, str, bool]]:
        with open_binary(source) as f:
            head = f.read(1 << 16).lstrip()
        if not head.startswith(b"["):  # many .json files are JSON Lines
            yield from self._jsonl(source)
            return
        # A JSON array has to be parsed whole (so it is bounded like a line); prefer JSON Lines for large corpora.
        try:
            with _opened(source, self._tap) as f:
                raw = f.read(self.max_line_bytes + 1)
                if len(raw) > self.max_line_bytes:
                    raise DataError(f"{source.path}: a JSON array file longer than {_mb(self.max_line_bytes)}, the bound "
                                    "on what is parsed whole; convert it to JSON Lines (one record per line), or raise "
                                    "the bound with --max_line_mb N")
                f.read(1)  # to the end: the whole file went through the sha256 check
            data = json.loads(_decode(raw, source.path))
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{source.path}: invalid JSON ({str(e)[:200]})") from None
        except DataError:
            raise
        except Exception as e:
            error = _decompression_error(source, 0, e)
            if error is None:
                raise
            raise error from None
        del raw
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
        csv.field_size_limit(self.max_line_bytes)  # a quoted field over several lines is bounded too

        def lines() -> Iterator[str]:
            for lineno, raw in self._lines(source):
                yield _decode(raw, f"{source.path}:{lineno}")

        reader = csv.DictReader(lines(), delimiter="\t" if source.kind == "tsv" else ",")
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
        except csv.Error as e:
            bound = (f"; a field is bounded by --max_line_mb ({_mb(self.max_line_bytes)})"
                     if "field larger than field limit" in str(e) else "")
            raise DataError(f"{source.path}:{reader.line_num}: malformed CSV ({e}){bound}") from None

    def _text(self, source: Source) -> Iterator[tuple[int, str, bool]]:
        """The file streamed in chunks of at most READ_CHUNK bytes: a document (the file, a paragraph or a line)
        is handed on as it is read, never held whole. A byte that is not UTF-8 drops its line under 'skip' (the
        rest of it, in a line longer than READ_CHUNK)."""
        by = self.sample_by
        lineno, start, column = 0, 1, 0  # column: bytes of the current line read so far
        in_document = False  # paragraph / line: a document is open
        held = ""  # paragraph / line: line ends held back (a document's trailing newlines are not part of it)
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        try:
            with _opened(source, self._tap) as f:
                while chunk := f.readline(READ_CHUNK):
                    first = column == 0
                    if first:
                        lineno += 1
                        decoder.reset()
                    # the line ends here: a newline, or fewer bytes than asked without one (the end of the file)
                    ends = chunk.endswith(b"\n") or len(chunk) < READ_CHUNK
                    try:
                        text = decoder.decode(chunk, final=ends)
                    except UnicodeDecodeError as e:
                        at = column - (len(e.object) - len(chunk)) + e.start + 1  # (bytes held from the last chunk)
                        self._fail(DataError(f"{source.path}:{lineno}: not UTF-8 (byte 0x{e.object[e.start]:02x} at "
                                             f"column {at})"), "not_utf8")
                        while not ends and (chunk := f.readline(READ_CHUNK)):  # skipped: the rest of the line
                            ends = chunk.endswith(b"\n") or len(chunk) < READ_CHUNK
                        column = 0
                        continue
                    column = 0 if ends else column + len(chunk)
                    if by == "document":
                        if text:
                            in_document = True
                            yield 1, text, False
                        continue
                    blank = first and ends and not text.strip()  # (a line longer than one chunk counts as text)
                    if blank:
                        if in_document and by == "paragraph":
                            yield start, "", True
                            in_document, held = False, ""
                        continue
                    if not in_document:
                        in_document, start, held = True, lineno, ""
                    text = held + text
                    body = text.rstrip("\r\n")
                    held = text[len(body):]
                    if body:
                        yield start, body, False
                    if by == "line" and ends:
                        yield start, "", True
                        in_document, held = False, ""
                if column:  # the file ends inside a line: its last bytes must end a character
                    try:
                        decoder.decode(b"", final=True)
                    except UnicodeDecodeError as e:
                        self._fail(DataError(f"{source.path}:{lineno}: not UTF-8 (the file ends inside a character: "
                                             f"{e.reason})"), "not_utf8")
        except DataError:
            raise
        except Exception as e:
            raise _decompression_error(source, lineno, e) or e
        if in_document:
            yield (1 if by == "document" else start), "", True

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


def _cut(text: str, start: int, piece_chars: int) -> int:
    """Where the piece of `text` that starts at `start` ends (see `split_text`); reads text[:start + 1.25 x
    piece_chars] only."""
    window_end = start + piece_chars
    lo, hi = window_end - piece_chars // 4, window_end + piece_chars // 4
    match = _SAFE_CUT.search(text, lo, hi) or _SAFE_SPACE_CUT.search(text, lo, hi)
    return match.start() if match else window_end


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
        cut = _cut(text, start, piece_chars)
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class _Pieces:
    """A document that arrives in fragments (a text file read in chunks), cut into exactly the pieces
    `split_text` cuts the whole into, holding at most about 1.25 x piece_chars characters plus one fragment."""

    def __init__(self, piece_chars: int) -> None:
        self.piece_chars = piece_chars
        self.text = ""

    def add(self, text: str) -> list[str]:
        """The pieces that this fragment completes."""
        if not text:
            return []
        self.text = self.text + text if self.text else text
        window = self.piece_chars + self.piece_chars // 4  # a cut depends on this many characters from its start
        pieces, start = [], 0
        while len(self.text) - start > window:
            cut = _cut(self.text, start, self.piece_chars)
            pieces.append(self.text[start:cut])
            start = cut
        if start:
            self.text = self.text[start:]
        return pieces

    def end(self) -> list[str]:
        """The document's last pieces."""
        pieces, self.text = split_text(self.text, self.piece_chars), ""
        return pieces
