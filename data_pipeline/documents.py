"""Documents out of every format: JSON Lines, JSON, CSV, Parquet, text (by document, paragraph or line), saved
and hub datasets; every line and document bounded (--max_line_mb, --max_document_mb), every bad record named by
file and line, or counted and skipped under --on_error skip."""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Iterator
from typing import Any

from data_pipeline.opening import READ_CHUNK, SourceChanged, Tap, decompression_error, open_binary, opened
from data_pipeline.pieces import PIECE_CHARS, Pieces
from data_pipeline.sources import MAX_DOCUMENT_MB, MAX_LINE_MB, SAMPLE_BY, Document, SkipCounter, Source
from tlm_base.errors import DataError


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
        raise DataError(f"{where}: no field '{text_field}' (fields: {fields}); choose one with --text_field")
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
        self._tap: Tap | None = None
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
        """Check the source whose reading stopped early (a consumer that stopped, e.g. at --max_tokens) against
        its sha256: the rest of its file is hashed without being read as text."""
        if self._reading is not None:
            self._check_source(self._reading, self._tap)

    def _check_source(self, index: int, tap: Tap | None) -> None:
        """Raise SourceChanged when the source's bytes as read are not those fingerprinted."""
        self._reading = None
        change = self._change(index, tap)
        if change:
            raise SourceChanged(change)

    def _change(self, index: int, tap: Tap | None) -> str | None:
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
            tap = Tap() if checked and source.kind not in ("hf", "disk", "parquet") else None
            self._tap, self._reading = tap, index if checked else None
            count = self.documents_per_source[index] = 0
            pieces: Pieces | None = None  # the document being handed on
            start = chars = 0
            try:
                dropping = False  # skipping the rest of a document past the bound
                for record, text, final in readers[source.kind](source):
                    if dropping:
                        dropping = not final
                        continue
                    if pieces is None:
                        pieces, start, chars = Pieces(self.piece_chars), record, 0
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
            with opened(source, self._tap) as f:
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
            raise decompression_error(source, lineno, e) or e

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
            with opened(source, self._tap) as f:
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
            error = decompression_error(source, 0, e)
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
                            "choose one with --text_field")
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
                                f"{', '.join(reader.fieldnames)}); choose one with --text_field")
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
            with opened(source, self._tap) as f:
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
            raise decompression_error(source, lineno, e) or e
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
                # (--max_tokens) never downloads the rest.
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
                            "choose one with --text_field")
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
