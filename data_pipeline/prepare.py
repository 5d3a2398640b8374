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
import logging
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    token_dtype,
)
from data_pipeline.documents import DocumentReader
from tlm_base.errors import DataError
from data_pipeline.opening import SourceChanged
from data_pipeline.sources import Document, resolve_sources
from data_pipeline.tokenizer import EOT, separator_token, tokenizer_sha256
from data_pipeline.workers import assign_sources, worker_dir
from tlm_base.fileio import (
    DiskFullError, LineAppender, atomic_write_json, check_output_folder, disk_full, is_disk_full,
)
from tlm_base.locks import FolderLock
from data_pipeline.parallel import BatchEncoder, available_cores
from data_pipeline.tokenizer_files import load_tokenizer
from data_pipeline.journal import JOURNAL, read_journal
from data_pipeline.output import (
    drop_if_empty, partial_dir, refuse_data_near, refuse_foreign_files, replaced_dir, swap_in,
)
from data_pipeline.packing import SplitState, SplitWriter
from data_pipeline.prepare_config import SPLITS, PrepareConfig, describe_inputs, fingerprint_of, input_changes, val_selector

log = logging.getLogger("tlm.prepare")


class PrepareStopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP during prepare: it stops as Ctrl-C does (`tlm: interrupted`); rerunning resumes."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
        raise DataError(f"--num_proc must be a positive number of processes, got {num_proc!r}")
    root = Path(config.out)
    out = worker_dir(root, config.worker_index, config.num_workers) if config.num_workers > 1 else root
    for folder in (out, partial_dir(out)):  # a file in its place or above it, a name too long (with .partial), /proc
        check_output_folder(folder, "prepare output", "--out")
    if out.is_symlink():  # the folder itself is replaced at the end, not the link to it
        out = out.resolve()
    refuse_data_near(config, out)
    refuse_foreign_files(out)
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
                drop_if_empty(partial_dir(out))
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


def no_val_hint(config: PrepareConfig, sources: list[Source]) -> str:
    """Why a validation split got no rows, and the way out that applies to these sources."""
    if config.sample_by == "document" and any(s.kind == "text" for s in sources):
        return " (each text file is one document with --sample_by document: try --sample_by paragraph, or --val_data)"
    return " (too few documents were held out to fill one row: hold out more with --val, or give --val_data)"


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
        swap_in(partial, out)
    shutil.rmtree(replaced_dir(out), ignore_errors=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists() and not overwrite:
        from data_pipeline.dataset import load_manifest

        existing = load_manifest(out)
        if existing.get("fingerprint") == fingerprint:
            log.info("%s is already prepared with these settings", out)
            return {**existing, "reused": True}
        raise DataError(f"'{out}' already holds a prepared dataset made with other settings "
                        f"({input_changes(existing.get('inputs'), described)}); pass --overwrite to replace it")
    refuse_foreign_files(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for stale in partial.glob(".*.tmp"):
        stale.unlink()
    states = None
    if (partial / JOURNAL).exists():
        try:
            states = read_journal(partial, fingerprint, described, sources)
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
    held_out = val_selector(config)

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
                if stop is not None and position > stop:  # --max_tokens reached: nothing after it, in any split
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
    source_documents = [0] * len(sources)  # with --max_tokens: documents up to the stop, per source

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
        reader.finish()  # reading stopped early (--max_tokens): the rest of that file is hashed all the same
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
                   f"row of {config.seq_len + 1}; use more data, a shorter --seq_len, or --val 0")
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
                    writers["val"].documents_fed, no_val_hint(config, sources))
    atomic_write_json(partial / MANIFEST, manifest)  # whole: the dataset exists from here (in OUT.partial) ...
    swap_in(partial, out)  # ... and is OUT from here, in one step; an old dataset there goes only now
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
