"""Hostile input sizes and events around `tlm prepare` and the shards it writes: a source edited while it is
read, mixture weights that overflow, a line or a document past its bound (a decompression bomb), a shard size of
nan, --out inside the data, SIGTERM / SIGHUP during prepare, a shard truncated under a training run, and an
--overwrite that is killed. Each ends in one line (or a correct result) and leaves the folders as they were, or
as a clean run leaves them; never a traceback, never a dataset made of two versions of its input."""

from __future__ import annotations

import json
import lzma
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import data_pipeline.prepare as prepare_module
import data_pipeline.documents as documents_module
import data_pipeline.opening as opening_module
from data_pipeline.dataset import TokenRows, load_manifest
from data_pipeline.mixture import allocate, parse_mix
from data_pipeline.journal import JOURNAL
from data_pipeline.output import partial_dir
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.documents import DocumentReader
from data_pipeline.sources import resolve_sources
from tlm_base.errors import DataError
from hostile import child, cli, copy_dataset, refused, snapshot, train_args


def prepare_args(source: Path, tokenizer: Path, out: Path, *extra: str, val: str = "0.05") -> list:
    return ["prepare", "--out", out, "--data", source, "--tokenizer", tokenizer, "--seq_len", "64", "--val", val,
            "--shard_mb", "0.01", "--num_proc", "1", *extra]


def settings(source: Path, tokenizer: Path, out: Path, **extra) -> PrepareConfig:
    return PrepareConfig(data=[str(source)], tokenizer=str(tokenizer), out=str(out),
                         **{"seq_len": 64, "val": 0.05, "shard_mb": 0.01, **extra})


def shards(folder: Path) -> dict[str, str]:
    return {k: v for k, v in snapshot(folder).items() if k.endswith(".arrow")}


def tlm_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("tlm:")]


@pytest.fixture()
def corpus(tmp_path: Path, shakespeare_jsonl: Path) -> Path:
    path = tmp_path / "corpus" / "corpus.jsonl"
    path.parent.mkdir()
    path.write_bytes(shakespeare_jsonl.read_bytes())
    return path


@pytest.fixture()
def reference(tmp_path: Path, corpus: Path, data_tokenizer: Path) -> Path:
    out = tmp_path / "reference"
    prepare(settings(corpus, data_tokenizer, out), progress=False, num_proc=1)
    return out


class Crash(Exception):
    pass


def crashing_journal(after: int) -> type:
    """prepare's journal, raising Crash (a kill) once it has committed `after` records."""
    commits = {"n": 0}

    class Journal(prepare_module.LineAppender):
        def write_json(self, record: dict) -> None:
            super().write_json(record)
            commits["n"] += 1
            if commits["n"] >= after:
                raise Crash()

    return Journal


def edit_while_read(monkeypatch: pytest.MonkeyPatch, path: Path, old: bytes, new: bytes) -> None:
    """Rewrite `path` in place (same size: `old` becomes `new`) once prepare has read its first 64 KiB, as an editor
    or a sync tool writing the file under a running prepare would."""
    for module in (documents_module, opening_module):  # where files are read in chunks of READ_CHUNK
        monkeypatch.setattr(module, "READ_CHUNK", 1 << 16)
    reads = {"n": 0}
    readinto = opening_module.TappedFile.readinto

    def reading(self, target):
        n = readinto(self, target)
        reads["n"] += 1
        if reads["n"] == 1:
            with open(path, "r+b") as f:
                f.write(path.read_bytes().replace(old, new))
        return n

    monkeypatch.setattr(opening_module.TappedFile, "readinto", reading)


# --- 1. a source that changes while prepare reads it ----------------------------------------------------------

def test_a_source_edited_while_prepare_reads_it_is_refused_and_nothing_is_kept(
        tmp_path: Path, corpus: Path, data_tokenizer: Path, reference: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """It used to be tokenized half old, half new under the old file's sha256, and a prepare of the restored
    file then answered "reused". An edit that breaks a record is reported as what it is, too."""
    original = corpus.read_bytes()
    out = tmp_path / "out"
    for old, new in ((b"the", b"THE"), (b"e", b"E")):  # the text only; also the field names ("tExt")
        with monkeypatch.context() as patch:
            edit_while_read(patch, corpus, old, new)
            refused(prepare_args(corpus, data_tokenizer, out), capsys, f"{corpus} changed while prepare read it (sha256",
                    "none of it is kept", "rerun once nothing writes to the file")
        assert not out.exists() and not partial_dir(out).exists()  # nothing half-mixed, not even to resume from
        corpus.write_bytes(original)
    corpus.write_bytes(original)
    status, stdout, err = cli(prepare_args(corpus, data_tokenizer, out), capsys)
    assert status == 0 and json.loads(stdout.splitlines()[-1])["reused"] is False, err
    assert shards(out) == shards(reference)


def test_a_prepare_killed_after_its_source_changed_under_it_starts_afresh(
        tmp_path: Path, corpus: Path, data_tokenizer: Path, reference: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Edited while read, killed before the end of the file (so never checked), then restored: the shards it
    committed hold the edited text, and the journal's record of the bytes they came from says so."""
    original = corpus.read_bytes()
    out = tmp_path / "out"
    Journal = crashing_journal(after=3)

    with monkeypatch.context() as patch:
        edit_while_read(patch, corpus, b"the", b"THE")
        patch.setattr(prepare_module, "LineAppender", Journal)
        with pytest.raises(Crash):
            prepare(settings(corpus, data_tokenizer, out), progress=False, num_proc=1)
    lines = (partial_dir(out) / JOURNAL).read_text().splitlines()
    assert json.loads(lines[-1])["read"]["source"] == 0  # committed while the source was being read
    corpus.write_bytes(original)  # the fingerprint is the first one's again: only the bytes read tell
    with caplog.at_level("WARNING"):
        prepare(settings(corpus, data_tokenizer, out), progress=False, num_proc=1)
    assert "changed while the interrupted prepare read it" in caplog.text and "starting afresh" in caplog.text
    assert shards(out) == shards(reference)


# --- 2. mixture weights -----------------------------------------------------------------------------------------

def test_mixture_weights_of_1e308_are_normalised_before_they_are_summed() -> None:
    """1e308 + 1e308 overflowed: "one pass = 2 rows" of 13,322."""
    assert allocate([1e308, 1e308], 13322) == [6661, 6661]
    assert allocate([5e-324, 1e308], 100) == [1, 100]  # every part keeps a row
    assert allocate([0.7, 0.2, 0.1], 1000) == [700, 200, 100]


@pytest.mark.parametrize("weight, shown", [(10**400, "... (401 characters)"), (float("nan"), "nan"),
                                           (float("inf"), "inf"), (0, "0"), ("1", "'1'")])
def test_mixture_weights_that_are_not_finite_and_positive_are_refused(weight, shown: str) -> None:
    with pytest.raises(DataError, match=r"data.mix\[1\].weight must be a finite number > 0, got ") as refusal:
        parse_mix([{"path": "a", "weight": 1.0}, {"path": "b", "weight": weight}])
    assert str(refusal.value).endswith(shown) and "\n" not in str(refusal.value)


# --- 3. bounded inputs ------------------------------------------------------------------------------------------

def test_a_jsonl_line_past_the_bound_is_refused_naming_file_line_bound_and_flag(
        tmp_path: Path, data_tokenizer: Path, capsys: pytest.CaptureFixture) -> None:
    """A 156 KB .jsonl.xz held one 1 GiB line and took 4 GB of memory; the same with 3 MB and a bound of 1 MiB."""
    good = [json.dumps({"text": f"Line {i} of a small corpus of plays and poems."}) for i in range(3000)]
    lines = good[:1] + [json.dumps({"text": "x " * 1_500_000})] + good[1:]
    source = tmp_path / "data" / "bomb.jsonl.xz"
    source.parent.mkdir()
    source.write_bytes(lzma.compress(("\n".join(lines) + "\n").encode()))
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    refused(prepare_args(source, data_tokenizer, out, "--max_line_mb", "1"), capsys,
            f"{source}:2: a line longer than 1 MiB, the bound on a line that is parsed whole",
            "raise it with --max_line_mb N")
    assert snapshot(tmp_path) == before and not out.exists()  # refused before the first shard: nothing left
    status, _, err = cli(prepare_args(source, data_tokenizer, out, "--max_line_mb", "1", "--on_error", "skip"), capsys)
    assert status == 0, err
    manifest = load_manifest(out)
    assert manifest["skipped"]["by_reason"] == {"line_too_long": 1}
    assert manifest["sources"][0]["documents"] == len(good)
    status, _, err = cli(prepare_args(source, data_tokenizer, tmp_path / "raised", "--max_line_mb", "4"), capsys)
    assert status == 0 and load_manifest(tmp_path / "raised")["sources"][0]["documents"] == len(lines), err


def test_a_json_array_past_the_bound_is_refused(tmp_path: Path, data_tokenizer: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "array.json"
    source.write_text(json.dumps([{"text": "word " * 100} for _ in range(3000)]))  # 1.6 MB, parsed whole
    refused(prepare_args(source, data_tokenizer, tmp_path / "out", "--max_line_mb", "1"), capsys,
            f"{source}: a JSON array file longer than 1 MiB", "convert it to JSON Lines", "--max_line_mb N")


def test_a_csv_field_past_the_bound_is_refused(tmp_path: Path, data_tokenizer: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "table.csv"
    source.write_text("id,text\n1,short\n2,\"" + "long line\n" * 200_000 + "\"\n")  # one quoted field of 2 MB
    refused(prepare_args(source, data_tokenizer, tmp_path / "out", "--max_line_mb", "1"), capsys,
            f"{source}:", "malformed CSV (field larger than field limit", "bounded by --max_line_mb (1 MiB)")


def bomb(path: Path, megabytes: int, line: bytes = b"All the world's a stage, and all the men and women players.\n") -> Path:
    """A .txt.xz of a few KB that expands to `megabytes` MB (written in pieces: never held whole here either)."""
    compressor = lzma.LZMACompressor()
    block = line * (2**20 // len(line) + 1)
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(compressor.compress(block[: 2**20]))
        f.write(compressor.flush())
    return path


def test_a_text_document_past_the_bound_is_refused_or_cut_and_counted(
        tmp_path: Path, data_tokenizer: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """A 468 KB .txt.xz expanding to 3 GiB died with MemoryError at 8 GB (the file was held whole to be split);
    the same shape at 3 MB with a bound of 1 MiB (the measured memory figure is in docs/data.md)."""
    source = bomb(tmp_path / "bomb.txt.xz", 3)
    assert source.stat().st_size < 10_000
    out = tmp_path / "out"
    refused(prepare_args(source, data_tokenizer, out, "--max_document_mb", "1", val="0"), capsys,
            f"{source}:1: document 1 of the file is longer than 1 MiB of text, the bound on one document",
            "raise it with --max_document_mb N", "--sample_by paragraph or line")
    assert not out.exists() and list(partial_dir(out).glob("*.arrow"))  # what was committed stays, to resume
    with caplog.at_level("INFO"):
        status, _, err = cli(prepare_args(source, data_tokenizer, out, "--max_document_mb", "4", val="0"), capsys)
    assert status == 0 and "resuming:" in caplog.text, err  # a raised bound resumes: under --on_error raise it is not
    assert load_manifest(out)["characters"] == 3 * 2**20  # part of the fingerprint (a whole run's output is the same)
    shutil.rmtree(out)
    status, _, err = cli(prepare_args(source, data_tokenizer, out, "--max_document_mb", "1", "--on_error", "skip",
                                      val="0"), capsys)
    assert status == 0, err
    manifest = load_manifest(out)
    assert manifest["skipped"]["by_reason"] == {"document_too_long": 1}
    assert manifest["characters"] == 2**20  # the document was cut at the bound
    assert "max_document_mb" in manifest["inputs"]  # under skip, the bound decides the output: it is in the fingerprint


@pytest.mark.parametrize("sample_by", ["document", "paragraph", "line"])
def test_a_text_file_is_streamed_whatever_its_shape(tmp_path: Path, sample_by: str) -> None:
    """One 4 MB line without a newline, and 4 MB of lines without a blank one: no piece (and no fragment the reader
    holds) is longer than the piece bound, and the pieces rejoin to the text."""
    for name, text in (("one-line", "word " * 800_000), ("no-blank", "a line of words\n" * 250_000)):
        path = tmp_path / f"{name}-{sample_by}.txt"
        path.write_text(text)
        reader = DocumentReader(resolve_sources(str(path)), sample_by=sample_by, piece_chars=50_000)
        pieces = list(reader.documents())
        assert max(len(p.text) for p in pieces) <= 62_500
        if sample_by == "line" and name == "no-blank":
            assert [p.final for p in pieces].count(True) == 250_000
        else:
            assert [p.final for p in pieces].count(True) == 1 and pieces[-1].final
            kept = text.rstrip("\r\n") if sample_by != "document" else text
            assert "".join(p.text for p in pieces) == kept


# --- 4. flags that are not finite numbers -----------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--shard_mb", "nan", "--shard_mb must be a finite number of MiB >= 0, got 'nan'"),
    ("--shard_mb", "inf", "--shard_mb must be a finite number of MiB >= 0, got 'inf'"),
    ("--shard_mb", "1e400", "--shard_mb must be a finite number of MiB >= 0, got inf"),
    ("--max_line_mb", "0", "--max_line_mb must be a finite number of MiB > 0, got 0"),
    ("--max_document_mb", "-1", "--max_document_mb must be a finite number of MiB > 0, got -1"),
    ("--val", "nan", "--val must be a fraction in [0, 1) or a number of documents, got 'nan'"),
    ("--seq_len", "1.5", "--seq_len must be a positive whole number, got 1.5"),
])
def test_flags_that_are_not_finite_are_one_line(tmp_path: Path, corpus: Path, data_tokenizer: Path, flag: str,
                                                 value: str, message: str, capsys: pytest.CaptureFixture) -> None:
    """`--shard_mb nan` or `inf` used to be a traceback."""
    out = tmp_path / "out"
    refused([*prepare_args(corpus, data_tokenizer, out), flag, value], capsys, message)
    assert not out.exists()


# --- 5. --out and the data --------------------------------------------------------------------------------------

def test_out_inside_the_data_folder_is_refused_before_anything_is_touched(
        tmp_path: Path, corpus: Path, data_tokenizer: Path, prepared: Path, capsys: pytest.CaptureFixture) -> None:
    """With --overwrite the old dataset used to be deleted, then the run died with a traceback."""
    data = corpus.parent
    out = copy_dataset(prepared, data / "out")  # a dataset that an earlier version put there
    shutil.copy(corpus, out / "corpus.jsonl")
    before = snapshot(tmp_path)
    refused([*prepare_args(data, data_tokenizer, out), "--overwrite"], capsys,
            f"--out '{out}' lies inside the data folder '{data}' (--data)", "choose an --out outside")
    refused(prepare_args(data, data_tokenizer, data), capsys, f"--out '{data}' is the data folder itself")
    refused([*prepare_args(out / "corpus.jsonl", data_tokenizer, out), "--overwrite"], capsys,
            f"--data '{out / 'corpus.jsonl'}' lies inside --out '{out}'", "would delete the data")
    refused([*prepare_args(f"{data}/**/*.jsonl", data_tokenizer, out)], capsys, "lies inside the data folder")
    assert snapshot(tmp_path) == before


def test_an_out_folder_holding_other_files_is_refused(tmp_path: Path, corpus: Path, data_tokenizer: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    refused([*prepare_args(corpus, data_tokenizer, out), "--overwrite"], capsys,
            f"--out '{out}' holds files that are not a tlm dataset's (notes.txt)", "choose another --out")
    assert snapshot(tmp_path) == before


# --- 6. signals during prepare ----------------------------------------------------------------------------------

def big_corpus(tmp_path: Path, corpus: Path, copies: int = 4) -> Path:
    path = tmp_path / "big" / "big.jsonl"
    path.parent.mkdir()
    path.write_bytes(corpus.read_bytes() * copies)
    return path


def wait_for_commits(out: Path, proc, lines: int = 3, timeout: float = 120) -> None:
    journal, deadline = partial_dir(out) / JOURNAL, time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= lines:
            return
        time.sleep(0.02)
    raise AssertionError(f"prepare ended (status {proc.poll()}) before it could be stopped: give it more work")


def test_sigterm_during_prepare_is_one_line_and_the_rerun_resumes(
        tmp_path: Path, corpus: Path, data_tokenizer: Path) -> None:
    """Under a worker pool it used to print a multiprocessing BrokenPipeError traceback (from the orphaned
    workers) and leave them running."""
    source = big_corpus(tmp_path, corpus)
    clean = tmp_path / "clean"
    first = child(prepare_args(source, data_tokenizer, clean))
    assert first.communicate(timeout=300) and first.returncode == 0
    out = tmp_path / "out"
    proc = child([*prepare_args(source, data_tokenizer, out)[:-2], "--num_proc", "2"], start_new_session=True)
    wait_for_commits(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and tlm_lines(err) == ["tlm: interrupted by SIGTERM"], err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in err and not out.exists()
    again = child(prepare_args(source, data_tokenizer, out))
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "resuming:" in err, err[-3000:]
    assert shards(out) == shards(clean)


def test_sighup_to_the_process_group_is_one_line(tmp_path: Path, corpus: Path, data_tokenizer: Path) -> None:
    """A closed terminal sends SIGHUP to every process of its group: the workers too."""
    source = big_corpus(tmp_path, corpus)
    out = tmp_path / "out"
    proc = child([*prepare_args(source, data_tokenizer, out)[:-2], "--num_proc", "2"], start_new_session=True)
    wait_for_commits(out, proc)
    os.killpg(proc.pid, signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 129 and tlm_lines(err) == ["tlm: interrupted by SIGHUP"], err[-3000:]
    assert "Traceback" not in err and "stopped by SIGHUP" in err


# --- 7. a shard truncated under a run ---------------------------------------------------------------------------

def test_a_shard_truncated_while_training_reads_it_is_one_line(tmp_path: Path, prepared: Path) -> None:
    """Shards used to be memory-mapped: the next read of the cut pages killed the run with SIGBUS, no message."""
    data = copy_dataset(prepared, tmp_path / "data")
    run = tmp_path / "run"
    proc = child(train_args(data, run, **{"train.max_steps": 100000, "eval.every": 100000,
                                          "checkpoint.every": 100000}))
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.05)
    for shard in data.glob("train-*.arrow"):
        os.truncate(shard, 1000)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    [line] = tlm_lines(err)
    assert line.startswith(f"tlm: error: {data}/train-") and "changed while this process read it" in line
    assert "933" not in line and "bytes when checked, 1000 now" in line


def test_a_shard_cut_under_open_rows_is_an_error_naming_it(tmp_path: Path, prepared: Path) -> None:
    data = copy_dataset(prepared, tmp_path / "data")
    rows = TokenRows(data)
    shard = data / rows.manifest["splits"]["train"]["shards"][0]["file"]
    os.truncate(shard, 1000)
    with pytest.raises(DataError, match=f"{shard}: changed while this process read it"):
        rows.gather(np.arange(100, 110))


# --- 8. a dataset appears whole or not at all ---------------------------------------------------------------------

def test_an_interrupted_overwrite_keeps_the_old_dataset_and_resumes(
        tmp_path: Path, corpus: Path, data_tokenizer: Path, reference: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """--overwrite used to delete the old dataset first: a kill then left none. Now it is replaced at the end."""
    out = copy_dataset(reference, tmp_path / "out")
    before = snapshot(out)
    Journal = crashing_journal(after=3)

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "LineAppender", Journal)
        with pytest.raises(Crash):
            prepare(settings(corpus, data_tokenizer, out, seq_len=32), overwrite=True, progress=False, num_proc=1)
    assert snapshot(out) == before and load_manifest(out)["seq_len"] == 64  # the old one, whole, still usable
    assert len(list(partial_dir(out).glob("train-*.arrow"))) == 2
    with caplog.at_level("INFO"):
        status, _, err = cli([*prepare_args(corpus, data_tokenizer, out), "--seq_len", "32", "--overwrite"], capsys)
    assert status == 0, err
    assert "resuming: train 2 shards" in caplog.text
    fresh = tmp_path / "fresh"
    prepare(settings(corpus, data_tokenizer, fresh, seq_len=32), progress=False, num_proc=1)
    assert shards(out) == shards(fresh) and load_manifest(out)["seq_len"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "fresh", "out", "reference"]  # nothing left


def test_a_swap_cut_between_its_two_renames_is_completed_by_the_rerun(
        tmp_path: Path, corpus: Path, data_tokenizer: Path, reference: Path, capsys: pytest.CaptureFixture) -> None:
    """Where the filesystem cannot exchange two folders in one step, OUT is renamed away, then the new one in: a
    kill in between leaves OUT missing, the old one aside and the new one whole. The next prepare puts it in."""
    out = tmp_path / "out"
    new = tmp_path / "new"
    prepare(settings(corpus, data_tokenizer, new, seq_len=32), progress=False, num_proc=1)
    os.rename(new, partial_dir(out))
    shutil.copytree(reference, tmp_path / ".out.replaced")
    status, stdout, err = cli([*prepare_args(corpus, data_tokenizer, out), "--seq_len", "32"], capsys)
    assert status == 0 and json.loads(stdout.splitlines()[-1])["reused"] is True, err
    assert load_manifest(out)["seq_len"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out", "reference"]


def test_a_dataset_folder_appears_only_whole(tmp_path: Path, corpus: Path, data_tokenizer: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """While a prepare runs (and after it is killed), OUT does not exist; readers are told what is going on."""
    out = tmp_path / "out"
    seen = []
    commit = prepare_module.SplitWriter._commit

    def committing(self) -> None:
        commit(self)
        seen.append(out.exists())
        if len(seen) == 2:
            raise Crash()

    monkeypatch.setattr(prepare_module.SplitWriter, "_commit", committing)
    with pytest.raises(Crash):
        prepare(settings(corpus, data_tokenizer, out), progress=False, num_proc=1)
    assert seen == [False, False] and not out.exists()
    with pytest.raises(DataError, match="holds no dataset yet: an unfinished `tlm prepare` is making it in out.partial"):
        load_manifest(out)
