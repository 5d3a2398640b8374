"""Hostile input to `tlm prepare`: its journal torn or garbled, a source edited in place between runs, two
prepares on one folder, a full disk. Each ends in one line (or a warning and a correct result) and never in a
dataset that mixes old and new text."""

from __future__ import annotations

import json
import os
import resource
import signal
from pathlib import Path

import pytest

import data_pipeline.prepare as prepare_module
from data_pipeline.journal import JOURNAL
from data_pipeline.output import partial_dir
from data_pipeline.prepare import PrepareConfig, prepare
from tlm_base.errors import DataError
from hostile import child, cli, hold_lock, refused, snapshot


def settings(source: Path, tokenizer: Path, out: Path, **extra) -> PrepareConfig:
    return PrepareConfig(data=[str(source)], tokenizer=str(tokenizer), out=str(out), seq_len=64, val=0.05,
                         shard_mb=0.01, **extra)


def prepare_args(source: Path, tokenizer: Path, out: Path) -> list[str]:
    return ["prepare", "--out", out, "--data", source, "--tokenizer", tokenizer, "--seq_len", "64", "--val", "0.05",
            "--shard_mb", "0.01"]


class Crash(Exception):
    pass


def interrupted(monkeypatch: pytest.MonkeyPatch, config: PrepareConfig, lines: int) -> None:
    """Run prepare until its journal holds `lines` lines, then stop it as a kill would."""
    count = {"n": 0}

    class Journal(prepare_module.LineAppender):
        def write_json(self, record: dict) -> None:
            super().write_json(record)
            count["n"] += 1
            if count["n"] >= lines:
                raise Crash()

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "LineAppender", Journal)
        with pytest.raises(Crash):
            prepare(config, progress=False)


@pytest.fixture()
def corpus(tmp_path: Path, shakespeare_jsonl: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(shakespeare_jsonl.read_bytes())
    return path


@pytest.fixture()
def reference(tmp_path: Path, corpus: Path, data_tokenizer: Path) -> Path:
    out = tmp_path / "reference"
    prepare(settings(corpus, data_tokenizer, out), progress=False)
    return out


def shards(folder: Path) -> dict[str, str]:
    return {k: v for k, v in snapshot(folder).items() if k.endswith(".arrow")}


def test_a_torn_journal_line_is_cut_with_a_warning_and_the_rerun_resumes(
        tmp_path: Path, corpus: Path, data_tokenizer: Path, reference: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    interrupted(monkeypatch, settings(corpus, data_tokenizer, out), lines=3)
    with open(partial_dir(out) / JOURNAL, "ab") as f:
        f.write(b'{"split": "train", "state": {"shards": [{"file": "tr')  # a kill in the middle of a line
    with caplog.at_level("WARNING"):
        prepare(settings(corpus, data_tokenizer, out), progress=False)
    assert "cut a torn last line" in caplog.text
    assert shards(out) == shards(reference)


def test_a_garbled_journal_line_is_one_error_naming_the_line(
        tmp_path: Path, corpus: Path, data_tokenizer: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    interrupted(monkeypatch, settings(corpus, data_tokenizer, out), lines=3)
    journal = partial_dir(out) / JOURNAL
    lines = journal.read_text().splitlines()
    lines[1] = lines[1].replace('"rows": ', '"rows": -')
    journal.write_text("\n".join(lines) + "\n")
    before = snapshot(tmp_path)
    refused(prepare_args(corpus, data_tokenizer, out), capsys, f"{journal}:2: key 'state.",
            "rerun with --overwrite to start afresh")
    assert snapshot(tmp_path) == before


def test_a_source_edited_under_an_interrupted_prepare_is_refused(
        tmp_path: Path, corpus: Path, data_tokenizer: Path, reference: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Same size, same mtime, other bytes: the rerun used to 'resume', mixing old and new text."""
    out = tmp_path / "out"
    interrupted(monkeypatch, settings(corpus, data_tokenizer, out), lines=3)
    stat = corpus.stat()
    text = corpus.read_bytes()
    corpus.write_bytes(text.replace(b"First Citizen", b"Fir5t Citizen"))
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert corpus.stat().st_size == stat.st_size and corpus.stat().st_mtime_ns == stat.st_mtime_ns
    before = snapshot(tmp_path)
    refused(prepare_args(corpus, data_tokenizer, out), capsys, "holds an interrupted prepare whose input has changed",
            f"source {corpus} changed (sha256")
    assert snapshot(tmp_path) == before
    status, _, err = cli([*prepare_args(corpus, data_tokenizer, out), "--overwrite"], capsys)
    assert status == 0, err


def test_a_finished_dataset_of_an_edited_source_is_not_reused(
        tmp_path: Path, corpus: Path, data_tokenizer: Path, reference: Path, capsys: pytest.CaptureFixture) -> None:
    corpus.write_bytes(corpus.read_bytes().replace(b"First Citizen", b"Fir5t Citizen"))
    before = snapshot(reference)
    refused(prepare_args(corpus, data_tokenizer, reference), capsys, "already holds a prepared dataset made with other "
            f"settings (source {corpus} changed", "pass --overwrite")
    assert snapshot(reference) == before


def test_a_second_prepare_is_refused_and_a_killed_holder_never_blocks(
        tmp_path: Path, corpus: Path, data_tokenizer: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    holder = hold_lock(out)
    refused(prepare_args(corpus, data_tokenizer, out), capsys, f"prepare output '{out}' is in use by pid {holder.pid} on",
            "wait for that prepare to finish, or choose another --out")
    assert not (out / "manifest.json").exists() and not partial_dir(out).exists()
    holder.send_signal(signal.SIGKILL)  # a lost node, an OOM kill: no chance to clean up
    holder.wait(30)
    status, _, err = cli(prepare_args(corpus, data_tokenizer, out), capsys)
    assert status == 0, err


def test_a_full_disk_during_prepare_is_one_line_and_the_rerun_resumes(
        tmp_path: Path, corpus: Path, data_tokenizer: Path, reference: Path) -> None:
    """A file-size limit makes a shard write fail as a full disk would (EFBIG): one line naming the file and
    the free space; with room again the same command finishes, byte-identical to an uninterrupted run."""
    out = tmp_path / "out"

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))  # a shard is ~60 kB

    full = child(prepare_args(corpus, data_tokenizer, out), preexec_fn=small_files)
    assert full.wait(120) == 2
    err = full.stderr.read()
    lines = [line for line in err.splitlines() if line.startswith("tlm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "File too large" in lines[0] and "free there" in lines[0] and "resumes from the last committed shard" in lines[0]
    again = child(prepare_args(corpus, data_tokenizer, out))
    assert again.wait(120) == 0, again.stderr.read()[-2000:]
    assert shards(out) == shards(reference)
    assert json.loads((out / "manifest.json").read_text())["splits"] == json.loads(
        (reference / "manifest.json").read_text())["splits"]


def test_a_journal_write_that_fails_tears_no_line(tmp_path: Path) -> None:
    """A line that does not fit (a full disk) is rolled back: the file ends at the previous line."""
    path = tmp_path / "j.jsonl"
    code = f"""
import resource, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from pathlib import Path
from tlm_base.fileio import LineAppender, DiskFullError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
j = LineAppender(Path({str(path)!r}))
j.write_json({{"a": 1}})
resource.setrlimit(resource.RLIMIT_FSIZE, (30, 30))
try:
    j.write_json({{"b": "x" * 100}})
except DiskFullError as e:
    print("refused:", e)
"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "refused: cannot write" in result.stdout and "File too large" in result.stdout, result.stderr
    assert path.read_text() == '{"a": 1}\n'


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_prepare_output_honours_the_umask(tmp_path: Path, corpus: Path, data_tokenizer: Path, umask: int,
                                          mode: int) -> None:
    """0644 under the usual umask 022, as every other tool's output (not the 0600 of mkstemp)."""
    previous = os.umask(umask)
    try:
        out = tmp_path / "out"
        prepare(settings(corpus, data_tokenizer, out), progress=False)
    finally:
        os.umask(previous)
    for path in [out / "manifest.json", *out.glob("*.arrow")]:
        assert path.stat().st_mode & 0o777 == mode, path


def test_an_unfinished_prepare_is_not_read_as_a_dataset(tmp_path: Path, corpus: Path, data_tokenizer: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from data_pipeline.dataset import load_manifest

    out = tmp_path / "out"
    interrupted(monkeypatch, settings(corpus, data_tokenizer, out), lines=2)
    with pytest.raises(DataError, match="unfinished `tlm prepare`"):
        load_manifest(out)
