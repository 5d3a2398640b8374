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

import collections
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlm_base.errors import DataError
from tlm_base.fileio import file_kind

COMPRESSIONS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd", ".bz2": "bz2"}
FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
    ".csv": "csv", ".tsv": "tsv", ".txt": "text", ".text": "text", ".md": "text",
}
SAMPLE_BY = ("document", "paragraph", "line")
# The bounds on input sizes (prepare's --max_line_mb and --max_document_mb raise them).
MAX_LINE_MB = 128  # a line held whole to be parsed: a JSON Lines record, a CSV row, a whole JSON array file
MAX_DOCUMENT_MB = 1024  # one document, in MiB of characters (2**20 characters per MiB)
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


