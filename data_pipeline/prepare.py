"""`tlm prepare`: raw text -> tokenized, packed Arrow shards + manifest.json.

Documents are read in order, tokenized in batches (encode_batch) and appended to their split's writer
(train, or val when held out). In pack mode each document is followed by the end-of-text token and
the token stream is cut into rows of seq_len + 1; in no-pack mode each document becomes one row,
truncated and padded, with its real length stored for the loss mask.

Crash safety: a dataset is built in a folder beside its target, OUT.partial, and swapped into OUT under
OUT's lock once it is whole (manifest.json written last), so OUT holds a whole dataset or none, never half of
one, and `--overwrite` replaces an old dataset only at that swap (a kill keeps the old one). In OUT.partial, a
shard is committed (fsync + rename) and then recorded in a journal together with the exact point of the input
where the next shard starts (piece number and token offset) and how far each source's bytes were read (with
their sha256). A rerun with the same settings skips everything before that point without tokenizing it and
continues; the result is byte-identical to an uninterrupted run.

Sources are fingerprinted by content before reading, and hashed again as they are read for tokenizing: a
source that changes while it is read is refused (and what was made from it discarded), never recorded under
the first version's fingerprint.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    BATCH_ROWS,
    ShardFile,
    shard_schema,
    token_dtype,
)
from data_pipeline.sources import (
    HF_PREFIX, MAX_DOCUMENT_MB, MAX_LINE_MB, PIECE_CHARS, SAMPLE_BY, DataError, Document, DocumentReader, Source,
    SourceChanged, resolve_sources, sha256_prefix,
)
from data_pipeline.tokenizer import EOT, separator_token, tokenizer_sha256
from data_pipeline.workers import assign_sources, worker_dir
from data_pipeline.formats import JournalEntry, JournalHeader
from tlm_base.fileio import (
    DiskFullError, LineAppender, atomic_write_json, check_output_folder, cut_torn_tail, disk_full, fsync_path,
    is_disk_full, sha256_file,
)
from tlm_base.locks import FolderLock
from data_pipeline.parallel import BatchEncoder, available_cores
from tlm_base.schema import parse
from data_pipeline.tokenizer_files import load_tokenizer

log = logging.getLogger("tlm.prepare")
JOURNAL = ".prepare-journal.jsonl"
OPTIONAL_SETTINGS = ("eot_token", "hf_config", "max_tokens")
# The size bounds change the output only where they skip (--on-error skip): part of the fingerprint there alone,
# and only when not the default (datasets prepared before the bounds existed keep their fingerprint).
BOUNDS = {"max_line_mb": MAX_LINE_MB, "max_document_mb": MAX_DOCUMENT_MB}
SPLITS = ("train", "val")
# What a dataset folder (OUT, or OUT.partial while it is made) may hold: anything else is not prepare's to replace.
_OWN_FILE = re.compile(r"^(\.lock|manifest\.json|\.prepare-journal\.jsonl|(train|val)-\d{5,}\.arrow|\..+\.tmp)$")


def partial_dir(out: Path) -> Path:
    """Where the dataset for OUT is made (and an interrupted prepare resumes) before it is swapped into OUT."""
    out = Path(out).absolute()
    return out.with_name(out.name + ".partial")


def _replaced_dir(out: Path) -> Path:
    """Where OUT's previous folder goes at the swap, to be deleted."""
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.replaced")


class PrepareStopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP during prepare: it stops as Ctrl-C does (`tlm: interrupted`); rerunning resumes."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
            raise DataError("give either --val (held out from --data) or --val-data (a separate source), not both")
        if not 0 <= self.worker_index < self.num_workers:
            raise DataError(f"--worker-index must be in [0, {self.num_workers}), got {self.worker_index}")
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise DataError(f"--max-tokens must be a positive number of tokens, got {self.max_tokens!r}")
        if self.num_workers > 1 and isinstance(self.val, int) and self.val:
            raise DataError("--val N (a count of documents) needs one worker; give a fraction or --val-data")


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
    # --max-tokens: the reading position (piece number over all splits) at which the train split filled up;
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
        self.position = position  # the reading position, recorded as stop_after when --max-tokens is reached
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
        """The split holds the rows --max-tokens asks for."""
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


def _val_selector(config: PrepareConfig):
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


def _read_journal(out: Path, fingerprint: str, described: dict[str, Any],
                  sources: list[Source]) -> dict[str, SplitState] | None:
    """The committed state of an interrupted run with the same inputs, or None to start afresh (no journal,
    a committed shard damaged since, or a source whose bytes that run read differ from the file's now: it
    changed while that run read it). Other inputs or settings are refused: mixing them would be silent."""
    path = out / JOURNAL
    if not path.exists():
        return None
    cut_torn_tail(path)  # a line cut by a kill or a full disk: that shard was never recorded, so it is redone
    fix = "rerun with --overwrite to start afresh (losing the interrupted progress)"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e}); {fix}") from None
        schema = JournalHeader if number == 1 else JournalEntry
        records.append(parse(schema, record, f"{path}:{number}", DataError, fix))
    if not records:
        return None
    header = records[0]
    if header.fingerprint != fingerprint:
        changes = input_changes(header.described, described)
        old_paths = [s["path"] for s in (header.described or {}).get("sources", [])]
        if header.described and old_paths == [s["path"] for s in described["sources"]] and \
                {k: v for k, v in header.described.items() if k != "sources"} == \
                {k: v for k, v in described.items() if k != "sources"}:
            # Same flags, same files, other bytes: an input was edited under an interrupted run.
            raise DataError(f"'{out}' holds an interrupted prepare whose input has changed since ({changes}); "
                            f"{fix} from the new content, or restore the file and rerun")
        log.warning("%s: an interrupted prepare with other settings is there (%s); starting afresh", out, changes)
        return None
    states = {split: SplitState() for split in SPLITS}
    for entry in records[1:]:
        states[entry.split] = SplitState(**entry.state.model_dump(include=set(SplitState.__dataclass_fields__)))
    for split, state in states.items():
        for shard in state.shards:
            file = out / shard["file"]
            if not file.exists() or file.stat().st_size != shard["bytes"] or sha256_file(file) != shard["sha256"]:
                log.warning("%s: committed shard %s is missing or damaged; starting afresh", out, shard["file"])
                return None
    read = getattr(records[-1], "read", None) if len(records) > 1 else None
    if read is not None:  # the committed shards came from these bytes: the file must still begin with them
        source = sources[read.source] if read.source < len(sources) else None
        try:
            same = source is not None and sha256_prefix(source.path, read.bytes) == read.sha256
        except OSError:
            same = False
        if not same:
            log.warning("%s: %s changed while the interrupted prepare read it (its first %d bytes differ from those "
                        "read then); starting afresh", out, source.path if source else "a source", read.bytes)
            return None
    return states


def prepare(config: PrepareConfig, overwrite: bool = False, progress: bool = True, wait: bool = False,
            num_proc: int | None = None) -> dict[str, Any]:
    """Run (or resume) the preparation; return the manifest.

    `num_proc` processes tokenize (default: the cores available); the output does not depend on it, so an
    interrupted run may resume with another count.

    The output folder has one owner: a second prepare on it is refused at once (or, with `wait`, waits for
    the first one, then finds its result). A full disk is one line; rerunning resumes from the last
    committed shard. SIGTERM and SIGHUP stop it as Ctrl-C does (PrepareStopped); rerunning resumes.
    """
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise DataError(f"--num-proc must be a positive number of processes, got {num_proc!r}")
    root = Path(config.out)
    out = worker_dir(root, config.worker_index, config.num_workers) if config.num_workers > 1 else root
    for folder in (out, partial_dir(out)):  # a file in its place or above it, a name too long (with .partial), /proc
        check_output_folder(folder, "prepare output", "--out")
    if out.is_symlink():  # the folder itself is replaced at the end, not the link to it
        out = out.resolve()
    _refuse_data_near(config, out)
    _refuse_foreign_files(out)
    # The lock is a file beside OUT (not inside: OUT is swapped away at the end; see tlm_base.folders.replace_folder), and
    # OUT's own .lock where there is one (an older tlm's prepare, a holder that locks the folder itself).
    hint = "wait for that prepare to finish, or choose another --out"
    parent = out.absolute().parent
    with contextlib.ExitStack() as held:
        held.enter_context(FolderLock(out, "prepare output", wait=wait, hint=hint, file=parent / f".{out.name}.lock"))
        if (out / ".lock").is_file():
            held.enter_context(FolderLock(out, "prepare output", wait=wait, hint=hint))
        try:
            try:
                with _stop_on_signals():
                    return _prepare(config, out, overwrite, progress, available_cores() if num_proc is None else num_proc)
            except BaseException:
                _drop_if_empty(partial_dir(out))
                raise
        except SourceChanged:
            shutil.rmtree(partial_dir(out), ignore_errors=True)  # made from a mix of two versions: nothing is kept
            raise
        except PrepareStopped as e:
            log.warning("prepare stopped by %s; what was committed is kept in %s: rerun the same command to resume",
                        e.args[0], partial_dir(out))
            raise
        except OSError as e:
            if is_disk_full(e) and not isinstance(e, DiskFullError):
                where = Path(e.filename) if getattr(e, "filename", None) else out
                raise disk_full(e, where, "free some space and rerun the same command: it resumes from the last "
                                "committed shard") from e
            raise


def _drop_if_empty(partial: Path) -> None:
    """After a failed or stopped prepare, remove OUT.partial when nothing was committed there (there is nothing to
    resume: a refusal before the first shard leaves the folders as they were)."""
    try:
        journal = partial / JOURNAL
        lines = journal.read_bytes().count(b"\n") if journal.exists() else 0
        if partial.is_dir() and lines <= 1 and not any(partial.glob("*.arrow")) and not (partial / MANIFEST).exists():
            shutil.rmtree(partial)
    except OSError:
        pass


@contextlib.contextmanager
def _stop_on_signals():
    """SIGTERM and SIGHUP raise PrepareStopped (a KeyboardInterrupt: one `tlm: interrupted` line, and the
    workers stopped) where nothing else handles them; a second signal during the cleanup is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def later(signum: int, frame: Any) -> None:  # (not SIG_IGN: a process started now would inherit that)
        log.info("%s: already stopping", signal.Signals(signum).name)

    def stop(signum: int, frame: Any) -> None:
        for sig in previous:
            signal.signal(sig, later)
        raise PrepareStopped(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:  # a caller's own handler (a trainer's) is left alone
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _local_path(item: str) -> Path | None:
    """The file or folder a --data item names on this machine (a glob: the folder its pattern starts in)."""
    text = item[len(HF_PREFIX):] if item.startswith(HF_PREFIX) else item
    path = Path(text).expanduser()
    if glob.has_magic(text):
        parts = []
        for part in path.parts:
            if glob.has_magic(part):
                break
            parts.append(part)
        path = Path(*parts) if parts else Path(".")
    return path if path.exists() else None


def _refuse_data_near(config: PrepareConfig, out: Path) -> None:
    """--out must lie apart from the data: inside a data folder its shards and manifest would be read back as
    data; with the data inside it, replacing the folder at the end would delete the data."""
    places = [out.resolve(), partial_dir(out).resolve(), _replaced_dir(out).resolve()]
    for flag, items in (("--data", config.data), ("--val_data", config.val_data or [])):
        for item in items:
            path = _local_path(str(item))
            if path is None:
                continue
            data = path.resolve()
            for place in places:
                if place == data:
                    raise DataError(f"--out '{out}' is the data folder itself ({flag} '{item}'): prepare would read its own "
                                    "output as data and replace the folder; choose an --out outside it")
                if data in place.parents:
                    raise DataError(f"--out '{out}' lies inside the data folder '{item}' ({flag}): its shards and "
                                    "manifest.json would be read back as data (and --overwrite would replace them); choose "
                                    f"an --out outside '{item}'")
                if place in data.parents:
                    raise DataError(f"{flag} '{item}' lies inside --out '{out}': prepare replaces that folder when it "
                                    "finishes, which would delete the data; move the data out or choose another --out")


def _refuse_foreign_files(out: Path) -> None:
    """OUT is replaced as a whole when the dataset is ready: it may hold nothing but a dataset's files, and may
    not be (or hold) the current folder or the home folder."""
    resolved = out.resolve()
    for place in (Path.cwd().resolve(), Path(os.path.expanduser("~")).resolve()):
        if resolved == Path(resolved.anchor) or resolved == place or resolved in place.parents:
            raise DataError(f"--out '{out}' is or holds {place} (the current folder or the home folder): prepare "
                            "replaces that folder when the dataset is ready; choose a folder of its own")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _OWN_FILE.match(p.name) or p.is_dir())
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(f"--out '{out}' holds files that are not a tlm dataset's ({shown}); prepare replaces the whole "
                        "folder when the new dataset is ready, so --out must be a new or empty folder or a prepared "
                        "dataset: choose another --out")


def _swap_in(partial: Path, out: Path) -> None:
    """Make the whole dataset in `partial` the folder `out` (under prepare's lock): one atomic exchange of the two
    folders where the filesystem allows it, else two renames (`out` is then missing for an instant, never half
    made). The previous folder is deleted; a reader that has its files open keeps reading them."""
    from tlm_base.folders import exchange

    (partial / JOURNAL).unlink(missing_ok=True)
    replaced = _replaced_dir(out)
    shutil.rmtree(replaced, ignore_errors=True)
    if not os.path.lexists(out):
        os.rename(partial, out)
    elif exchange(partial, out):
        os.rename(partial, replaced)  # the old folder, now under the partial name
    else:
        os.rename(out, replaced)
        os.rename(partial, out)
    fsync_path(out.absolute().parent)
    shutil.rmtree(replaced, ignore_errors=True)


def _prepare(config: PrepareConfig, out: Path, overwrite: bool, progress: bool, num_proc: int) -> dict[str, Any]:
    tok_dir = Path(config.tokenizer)
    tokenizer = load_tokenizer(tok_dir)
    tokenizer.encode_special_tokens = True  # '<|endoftext|>' written in a document is text, not a separator
    eot_token = config.eot_token or separator_token(tokenizer, tok_dir)
    eot = None if eot_token is None else tokenizer.token_to_id(eot_token)
    if eot is None:
        raise DataError(f"tokenizer '{tok_dir}' has no {eot_token or EOT} token to separate documents with (train one "
                        "with `tlm tokenizer`, or import one with `tlm tokenizer --from DIR`)")
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    tok_sha = tokenizer_sha256(tok_dir)

    train_sources = resolve_sources(config.data)
    val_sources = resolve_sources(config.val_data) if config.val_data else []
    sources = train_sources + val_sources
    described = describe_inputs(config, sources, tok_sha)
    fingerprint = fingerprint_of(described)

    partial = partial_dir(out)
    if (partial / MANIFEST).exists():  # a whole dataset whose swap into OUT was cut short: finish it
        log.info("%s: completing an interrupted prepare (its dataset is whole in %s)", out, partial)
        _swap_in(partial, out)
    shutil.rmtree(_replaced_dir(out), ignore_errors=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists() and not overwrite:
        from data_pipeline.dataset import load_manifest

        existing = load_manifest(out)
        if existing.get("fingerprint") == fingerprint:
            log.info("%s is already prepared with these settings", out)
            return {**existing, "reused": True}
        raise DataError(f"'{out}' already holds a prepared dataset made with other settings "
                        f"({input_changes(existing.get('inputs'), described)}); pass --overwrite to replace it")
    _refuse_foreign_files(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for stale in partial.glob(".*.tmp"):
        stale.unlink()
    states = None
    if (partial / JOURNAL).exists():
        try:
            states = _read_journal(partial, fingerprint, described, sources)
        except DataError as e:
            if not overwrite:
                raise
            log.warning("%s: not resuming the interrupted prepare there (%s); starting afresh (--overwrite)", partial, e)
    if states is None:
        for old in list(partial.glob("train-*.arrow")) + list(partial.glob("val-*.arrow")) + \
                [partial / JOURNAL, partial / MANIFEST]:
            old.unlink(missing_ok=True)
        states = {split: SplitState() for split in SPLITS}
    else:
        log.info("resuming: %s", ", ".join(f"{s} {len(st.shards)} shards" for s, st in states.items()))
    journal = LineAppender(partial / JOURNAL, fsync=True)
    if (partial / JOURNAL).stat().st_size == 0:  # a fresh start: the header first
        journal.write_json({"fingerprint": fingerprint, "described": described})

    def on_commit(split: str, state: SplitState) -> None:
        # with how far the source being read was read, and the sha256 of those bytes: a resume checks that the
        # file still begins with them (the shards were made from them)
        journal.write_json({"split": split, "state": asdict(state), "read": reader.read_position()})

    writers = {s: SplitWriter(partial, s, config, eot, dtype, states[s], on_commit) for s in SPLITS}
    reader = DocumentReader(sources, text_field=config.text_field, sample_by=config.sample_by,
                            on_error=config.on_error, hf_split=config.hf_split, piece_chars=config.piece_chars,
                            hf_config=config.hf_config, max_line_mb=config.max_line_mb,
                            max_document_mb=config.max_document_mb,
                            expected_sha256=[s["sha256"] for s in described["sources"]])
    mine, by_document = assign_sources(train_sources, config.num_workers, config.worker_index)
    indices = (mine if mine is not None else list(range(len(train_sources)))) + \
        [len(train_sources) + i for i in range(len(val_sources)) if config.worker_index == 0 or by_document]
    held_out = _val_selector(config)

    from tqdm import tqdm

    bar = tqdm(unit=" docs", file=sys.stderr, disable=not progress, mininterval=1.0, desc=f"prepare {out.name}")
    batch: list[tuple[SplitWriter, int, Document, int]] = []  # (writer, piece ordinal, piece, reading position)
    batch_chars = 0
    stats = {"documents": 0, "characters": 0}

    encoder = BatchEncoder(tokenizer, num_proc, dtype)

    def flush() -> None:
        nonlocal batch, batch_chars
        if not batch:
            return
        items = batch

        def done(ids: list[np.ndarray]) -> None:  # called in reading order, whatever the number of processes
            for (writer, ordinal, doc, position), piece_ids in zip(items, ids):
                stop = writers["train"].state.stop_after
                if stop is not None and position > stop:  # --max-tokens reached: nothing after it, in any split
                    break
                writer.add(ordinal, piece_ids, doc.final, position)
                if capped:  # counted as written, so that read-ahead never counts
                    count(writer, doc)
            bar.set_postfix(train_rows=writers["train"].state.rows, val_rows=writers["val"].state.rows, refresh=False)

        encoder.submit([doc.text for _, _, doc, _ in items], done)
        batch, batch_chars = [], 0

    number = -1  # document number in reading order (all sources of this run)
    kept = 0  # documents of this worker's share
    position = -1  # piece number in reading order
    capped = config.max_tokens is not None
    source_documents = [0] * len(sources)  # with --max-tokens: documents up to the stop, per source

    def count(writer: SplitWriter, doc: Document) -> None:
        writer.documents_fed += doc.final  # every document, also those a resume skips and those cut by the tail
        source_documents[doc.source] += doc.final
        stats["characters"] += len(doc.text)

    try:
        new_document = True
        for doc in reader.documents(indices):
            position += 1
            stop = writers["train"].state.stop_after
            if stop is not None and position > stop:  # a streamed hub dataset is never read further
                break
            if new_document:
                number += 1
                is_val = doc.source >= len(train_sources) or held_out(doc.source, doc.record, number)
                mine_doc = not by_document or number % config.num_workers == config.worker_index
                kept += mine_doc
                bar.update(1)
            new_document = doc.final
            if not mine_doc:
                continue
            writer = writers["val" if is_val else "train"]
            ordinal, needed = writer.claim()
            if not needed or not capped:
                count(writer, doc)
            if not needed:
                continue
            batch.append((writer, ordinal, doc, position))
            batch_chars += len(doc.text)
            if batch_chars >= config.tokenize_batch_chars or len(batch) >= 4096:
                flush()
        reader.finish()  # reading stopped early (--max-tokens): the rest of that file is hashed all the same
        flush()
        encoder.drain()
        for writer in writers.values():
            writer.finish()
    except BaseException:
        encoder.close(abort=True)
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        encoder.close()
        bar.close()
        journal.close()
    stats["documents"] = kept

    problem = None
    if kept == 0 and not any(w.state.rows for w in writers.values()):
        skipped = reader.skips.to_dict()["by_reason"]
        problem = f"no documents in {config.data}" + (f" (skipped: {skipped})" if skipped else "")
    elif writers["train"].state.rows == 0 and config.num_workers == 1:
        problem = (f"no training rows: {writers['train'].dropped_tokens} tokens left for training, fewer than one "
                   f"row of {config.seq_len + 1}; use more data, a shorter --seq-len, or --val 0")
    if problem:  # leave no half-dataset behind that a rerun would try to resume
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(problem)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "inputs": described,
        "seq_len": config.seq_len,
        "row_length": config.seq_len + 1,
        "mode": "pack" if config.pack else "nopack",
        "dtype": dtype.name,
        "tokenizer": {"sha256": tok_sha, "vocab_size": vocab_size, "eot_token_id": eot, "pad_token_id": eot,
                      "path": str(tok_dir)},
        "text_field": config.text_field,
        "sample_by": config.sample_by,
        "sources": [
            {"path": s.path, "kind": s.kind, "compression": s.compression, "bytes": s.size,
             "sha256": described["sources"][i]["sha256"],
             "documents": source_documents[i] if capped else reader.documents_per_source[i], "split": "val" if i >= len(train_sources) else "train"}
            for i, s in enumerate(sources) if i in indices
        ],
        "val": {"data": config.val_data, "held_out": config.val, "seed": config.seed},
        "workers": {"count": config.num_workers, "index": config.worker_index},
        "characters": stats["characters"],
        "skipped": reader.skips.to_dict(),
        "splits": {
            split: {
                "rows": w.state.rows,
                "tokens": w.state.tokens,
                "documents": w.documents_fed,
                "documents_in_rows": w.state.documents,
                "dropped_tokens": w.dropped_tokens,
                "truncated_documents": w.state.truncated_documents,
                "shards": w.state.shards,
                "max_token_id": max((sh["max_token_id"] for sh in w.state.shards), default=None),
            }
            for split, w in writers.items()
        },
    }
    if (config.val or config.val_data) and writers["val"].state.rows == 0 and config.num_workers == 1:
        log.warning("%s: validation was asked for (%s) but got no rows: %d documents held out%s; training on it will log "
                    "no validation loss", out, f"--val {config.val}" if config.val else "--val_data",
                    writers["val"].documents_fed, " (each text file is one document with --sample_by document: try "
                    "--sample_by paragraph, or --val_data)" if config.sample_by == "document" else "")
    atomic_write_json(partial / MANIFEST, manifest)  # whole: the dataset exists from here (in OUT.partial) ...
    _swap_in(partial, out)  # ... and is OUT from here, in one step; an old dataset there goes only now
    if reader.skips.total():
        log.warning("skipped %d records: %s", reader.skips.total(), reader.skips.to_dict()["by_reason"])
    return manifest


def prepare_command(out: str, data: Any = None, tokenizer: str | None = None, val: float | int | None = None,
                    val_data: Any = None, merge: bool = False, overwrite: bool = False, progress: bool = False,
                    num_proc: int | None = None, **settings: Any) -> dict[str, Any]:
    """`tlm prepare`: prepare (or merge workers' outputs into) OUT; the figures it prints (JSON)."""
    from data_pipeline import default_data
    from data_pipeline.workers import merge_workers

    start, start_cpu = time.perf_counter(), time.process_time()
    if merge:
        manifest = merge_workers(out)
    else:
        if tokenizer is None:
            raise DataError("give --tokenizer DIR (from `tlm tokenizer`), or --merge to combine worker outputs")
        data, val_data, val = default_data(data, val_data, val)
        config = PrepareConfig(data=_strings(data), tokenizer=str(tokenizer), out=str(out), val=val,
                               val_data=_strings(val_data) if val_data is not None else None, **settings)
        manifest = prepare(config, overwrite=overwrite, progress=progress, num_proc=num_proc)
    seconds = time.perf_counter() - start
    splits = {k: {f: v[f] for f in ("rows", "tokens", "documents")} | {"shards": len(v["shards"])}
              for k, v in manifest["splits"].items()}
    tokens = sum(v["tokens"] for v in manifest["splits"].values())
    log.info("prepared %s: %s", out, ", ".join(f"{k} {v['rows']} rows / {v['tokens']} tokens" for k, v in splits.items()))
    rate = not manifest.get("reused", False) and not merge  # a merge or a reuse tokenizes nothing: no rate
    return {"out": out, "seq_len": manifest["seq_len"], "mode": manifest["mode"], "splits": splits,
            "skipped": manifest["skipped"], "reused": manifest.get("reused", False), "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / max(seconds, 1e-9)) if rate else None,
            "mb_per_s": round(manifest["characters"] / 1e6 / max(seconds, 1e-9), 2) if rate else None,
            # this process alone (reading, packing, writing; tokenizing too with one process)
            "process_cpu_s": round(time.process_time() - start_cpu, 2)}


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
