"""`prepare`: packing, no-pack rows, determinism, crash + resume, workers, manifest checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import data_pipeline.prepare as prepare_module
from data_pipeline.journal import JOURNAL
from data_pipeline.output import partial_dir
from data_pipeline import TINYSHAKESPEARE
from data_pipeline.dataset import TokenRows, check_compatible, load_manifest
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.workers import merge_workers
from data_pipeline.documents import DocumentReader
from data_pipeline.sources import resolve_sources
from tlm_base.errors import DataError
from data_pipeline.tokenizer_files import load_tokenizer

SEQ = 64


def config(data, tokenizer: Path, out: Path, **kwargs) -> PrepareConfig:
    values = {"seq_len": SEQ, "shard_mb": 0.01, "val": 0.0, "piece_chars": 20_000, "tokenize_batch_chars": 50_000}
    return PrepareConfig(data=[str(d) for d in (data if isinstance(data, list) else [data])], tokenizer=str(tokenizer),
                         out=str(out), **{**values, **kwargs})


def all_rows(path: Path, split: str = "train") -> np.ndarray:
    rows = TokenRows(path, split)
    return rows.gather(np.arange(len(rows)))[0]


def expected_stream(data, tokenizer: Path, **reader_args) -> list[int]:
    """Each document tokenized whole, followed by the end-of-text token."""
    tok = load_tokenizer(tokenizer)
    tok.encode_special_tokens = True
    reader = DocumentReader(resolve_sources(data), piece_chars=10**9, **reader_args)
    return [i for doc in reader.documents() for i in tok.encode(doc.text).ids + [0]]


def num_docs(jsonl: Path) -> int:
    return len(jsonl.read_text().splitlines())


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.arrow"))}


def test_packed_rows_are_the_documents_with_separators(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    manifest = prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "out"), progress=False)
    stream = expected_stream(str(shakespeare_jsonl), data_tokenizer)
    rows = all_rows(tmp_path / "out")
    assert rows.shape[1] == SEQ + 1
    flat = rows.reshape(-1).tolist()
    train = manifest["splits"]["train"]
    assert flat == stream[: len(flat)]
    assert len(stream) - len(flat) == train["dropped_tokens"] < SEQ + 1
    assert train["rows"] == len(rows) and train["tokens"] == rows.size
    # every document fed, also the last one whose tail did not fill a row; the rows hold one separator per
    # document that ended inside them
    assert train["documents"] == num_docs(shakespeare_jsonl)
    assert train["documents_in_rows"] == flat.count(0) < train["documents"]
    assert len(train["shards"]) > 3 and manifest["tokenizer"]["vocab_size"] == 1000
    assert manifest["sources"][0]["documents"] == num_docs(shakespeare_jsonl)


def test_plain_text_with_pieces_equals_whole_tokenization(tmp_path: Path, data_tokenizer: Path) -> None:
    prepare(config(TINYSHAKESPEARE, data_tokenizer, tmp_path / "shk"), progress=False)
    flat = all_rows(tmp_path / "shk").reshape(-1).tolist()
    stream = expected_stream(str(TINYSHAKESPEARE), data_tokenizer)
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < SEQ + 1


def test_no_pack_one_document_per_row_with_loss_mask(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    manifest = prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "np", pack=False), progress=False)
    rows = TokenRows(tmp_path / "np")
    tok = load_tokenizer(data_tokenizer)
    tok.encode_special_tokens = True
    docs = [json.loads(line)["text"] for line in shakespeare_jsonl.read_text().splitlines()]
    assert len(rows) == len(docs) == manifest["splits"]["train"]["documents"]
    truncated = 0
    for i in (0, 1, 17, len(docs) - 1):
        ids = tok.encode(docs[i]).ids + [0]
        truncated += len(ids) > SEQ + 1
        ids = ids[: SEQ + 1]
        assert rows.length(i) == len(ids)
        assert rows.row(i)[: len(ids)].tolist() == ids and (rows.row(i)[len(ids):] == 0).all()
    assert manifest["splits"]["train"]["truncated_documents"] > 0
    from data_pipeline.stream import make_batch

    batch = make_batch(rows, np.array([0, 1]))
    assert batch["loss_mask"].shape == (2, SEQ)
    assert batch["loss_mask"][0].sum() == rows.length(0) - 1


def test_same_inputs_give_byte_identical_shards(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "a", val=0.05), progress=False)
    prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "b", val=0.05), progress=False)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    a, b = load_manifest(tmp_path / "a"), load_manifest(tmp_path / "b")
    assert a["splits"] == b["splits"] and a["fingerprint"] == b["fingerprint"]


class Crash(Exception):
    pass


def crash_after_journal_entries(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Kill `prepare` right after its journal has `count` entries (the first records the settings)."""
    calls = {"n": 0}

    class CrashingJournal(prepare_module.LineAppender):
        def write_json(self, record: dict) -> None:
            super().write_json(record)
            calls["n"] += 1
            if calls["n"] >= count:
                raise Crash("killed")

    monkeypatch.setattr(prepare_module, "LineAppender", CrashingJournal)


@pytest.mark.parametrize("pack", [True, False], ids=["pack", "nopack"])
@pytest.mark.parametrize("entries", [1, 3])
def test_an_interrupted_run_resumes_to_identical_output(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path,
                                                         monkeypatch: pytest.MonkeyPatch, pack: bool, entries: int) -> None:
    cfg = dict(val=0.05, pack=pack, shard_mb=0.01 if pack else 0.0)
    reference = tmp_path / "clean"
    prepare(config(shakespeare_jsonl, data_tokenizer, reference, **cfg), progress=False)
    out = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        crash_after_journal_entries(patch, entries)
        with pytest.raises(Crash):
            prepare(config(shakespeare_jsonl, data_tokenizer, out, **cfg), progress=False)
    assert not out.exists()  # never a folder holding half a dataset: it is made beside, in OUT.partial
    work = partial_dir(out)
    assert len(list(work.glob("*.arrow"))) == entries - 1
    if entries == 1:
        assert not work.exists()  # nothing committed: nothing left behind
    else:
        (work / ".train-99999.arrow.tmp").write_bytes(b"half-written")  # a shard torn by the kill
    prepare(config(shakespeare_jsonl, data_tokenizer, out, **cfg), progress=False)
    assert not list(out.glob(".*.tmp")) and not (out / JOURNAL).exists() and not work.exists()
    assert shard_bytes(out) == shard_bytes(reference)
    assert load_manifest(out)["splits"] == load_manifest(reference)["splits"]


def test_resume_skips_the_tokenizing_of_committed_input(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        crash_after_journal_entries(patch, 5)
        with pytest.raises(Crash):
            prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "o"), progress=False)
    added = {"pieces": 0}
    writer_add = prepare_module.SplitWriter.add

    def counting(self, ordinal, ids, final, position=0):
        added["pieces"] += 1
        return writer_add(self, ordinal, ids, final, position)

    monkeypatch.setattr(prepare_module.SplitWriter, "add", counting)
    prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "o"), progress=False)
    resumed, added["pieces"] = added["pieces"], 0
    prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "fresh"), progress=False)
    assert added["pieces"] == num_docs(shakespeare_jsonl)
    assert 0 < resumed < added["pieces"] - 2000  # the documents of four committed shards were not tokenized again


def test_a_finished_dataset_is_reused_or_refused(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "o"), progress=False)
    assert prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "o"), progress=False)["reused"]
    with pytest.raises(DataError, match=r"made with other settings \(seq_len: 64 -> 32\); pass --overwrite"):
        prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "o", seq_len=32), progress=False)
    manifest = prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "o", seq_len=32), overwrite=True, progress=False)
    assert manifest["seq_len"] == 32 and "reused" not in manifest


def test_validation_split_by_fraction_count_and_separate_data(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    m = prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "f", val=0.1, pack=False), progress=False)
    val, train = m["splits"]["val"]["documents"], m["splits"]["train"]["documents"]
    assert val + train == num_docs(shakespeare_jsonl) and 0.08 < val / (val + train) < 0.12
    m = prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "n", val=25, pack=False), progress=False)
    assert m["splits"]["val"]["documents"] == 25
    first = json.loads(shakespeare_jsonl.read_text().splitlines()[0])["text"]
    tok = load_tokenizer(data_tokenizer)
    assert TokenRows(tmp_path / "n", "val").row(0)[:5].tolist() == tok.encode(first).ids[:5]
    m = prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "d", val_data=[str(TINYSHAKESPEARE)]), progress=False)
    assert m["splits"]["val"]["rows"] > 1000 and m["splits"]["train"]["documents"] > num_docs(shakespeare_jsonl) - 5
    with pytest.raises(DataError, match="not both"):
        config(shakespeare_jsonl, data_tokenizer, tmp_path / "x", val=0.1, val_data=[str(TINYSHAKESPEARE)])
    with pytest.raises(DataError, match="fraction must be below 1"):
        config(shakespeare_jsonl, data_tokenizer, tmp_path / "x", val=1.5)


def test_workers_split_the_sources_and_merge(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    lines = shakespeare_jsonl.read_text().splitlines(keepends=True)
    for i in range(5):
        (parts / f"part-{i}.jsonl").write_text("".join(lines[i::5]))
    for w in range(2):
        prepare(config(parts, data_tokenizer, tmp_path / "out", num_workers=2, worker_index=w, val=0.05), progress=False)
    with pytest.raises(DataError, match="not a prepared dataset|merged manifest"):
        load_manifest(tmp_path / "out")
    merged = merge_workers(tmp_path / "out")
    assert merged["workers"]["count"] == 2
    assert sorted(s["path"] for s in merged["sources"]) == sorted(str(p) for p in parts.glob("*.jsonl"))
    single = prepare(config(parts, data_tokenizer, tmp_path / "one", val=0.05), progress=False)
    for split in ("train", "val"):
        # Same documents, split by the same hash; only the per-worker tails may differ.
        assert abs(merged["splits"][split]["documents"] - single["splits"][split]["documents"]) <= 2
    rows = TokenRows(tmp_path / "out")
    assert len(rows) == merged["splits"]["train"]["rows"]


def test_merge_refuses_missing_workers(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "out", num_workers=3, worker_index=1), progress=False)
    with pytest.raises(DataError, match="workers not finished: worker-000-of-003, worker-002-of-003"):
        merge_workers(tmp_path / "out")


def test_damaged_shards_are_refused(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "o"), progress=False)
    shard = tmp_path / "o" / "train-00001.arrow"
    original = shard.read_bytes()
    shard.write_bytes(original[:-100])
    with pytest.raises(DataError, match="train-00001.arrow: .* bytes, the manifest says"):
        TokenRows(tmp_path / "o")
    tampered = bytearray(original)
    tampered[5000] ^= 0xFF
    shard.write_bytes(bytes(tampered))
    with pytest.raises(DataError, match="train-00001.arrow: sha256 differs from the manifest"):
        TokenRows(tmp_path / "o")
    TokenRows(tmp_path / "o", verify="size")  # a size-only check cannot see the flipped byte
    shard.unlink()
    with pytest.raises(DataError, match="shard train-00001.arrow named in the manifest is missing"):
        TokenRows(tmp_path / "o")


def test_dataset_must_match_the_model(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    manifest = prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "o"), progress=False)
    sha = manifest["tokenizer"]["sha256"]
    check_compatible(manifest, vocab_size=1000, seq_len=SEQ, tokenizer_sha256=sha)
    with pytest.raises(DataError, match="its tokenizer has 1000 tokens but the model's vocab_size is 512"):
        check_compatible(manifest, vocab_size=512, seq_len=SEQ)
    with pytest.raises(DataError, match="prepared for seq_len 64, the run uses 512"):
        check_compatible(manifest, vocab_size=6400, seq_len=512)
    with pytest.raises(DataError, match="tokenized with another tokenizer"):
        check_compatible(manifest, vocab_size=6400, seq_len=SEQ, tokenizer_sha256="0" * 64)


def test_empty_results_are_explained(tmp_path: Path, data_tokenizer: Path) -> None:
    (tmp_path / "tiny.jsonl").write_text('{"text": "too short"}\n')
    with pytest.raises(DataError, match="no training rows"):
        prepare(config(tmp_path / "tiny.jsonl", data_tokenizer, tmp_path / "o"), progress=False)
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(DataError, match=r"no documents in .* \(skipped: \{'missing_field': 1, 'empty_file': 1\}\)"):
        prepare(config(tmp_path / "bad.jsonl", data_tokenizer, tmp_path / "o2", on_error="skip"), progress=False)
    assert not (tmp_path / "o2" / "manifest.json").exists()


def test_skips_are_reported_in_the_manifest(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    bad = tmp_path / "mixed.jsonl"
    shutil.copy(shakespeare_jsonl, bad)
    with open(bad, "ab") as f:
        f.write(b'{"text": 1}\n{broken\n\xff\n')
    with pytest.raises(DataError, match=rf"mixed.jsonl:{num_docs(shakespeare_jsonl) + 1}: field 'text' is int"):
        prepare(config(bad, data_tokenizer, tmp_path / "o"), progress=False)
    manifest = prepare(config(bad, data_tokenizer, tmp_path / "o", on_error="skip"), progress=False)
    assert manifest["skipped"]["by_reason"] == {"not_a_string": 1, "invalid_json": 1, "not_utf8": 1}


@pytest.mark.parametrize("pack", [True, False], ids=["pack", "nopack"])
def test_every_process_count_writes_the_same_bytes(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path,
                                                   pack: bool) -> None:
    cfg = dict(val=0.05, pack=pack, shard_mb=0.01 if pack else 0.0, tokenize_batch_chars=20_000)
    outputs = {}
    for n in (1, 2, 3):
        manifest = prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / f"p{n}", **cfg), progress=False,
                           num_proc=n)
        outputs[n] = shard_bytes(tmp_path / f"p{n}"), (tmp_path / f"p{n}" / "manifest.json").read_bytes()
        assert manifest["splits"]["train"]["rows"] > 0
    assert len(outputs[1][0]) > 3  # several shards, from many batches
    assert outputs[1] == outputs[2] == outputs[3]  # the shards and the manifest, byte for byte


def test_num_proc_is_checked_before_any_work(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path) -> None:
    for bad in (0, -2, 1.5, True):
        with pytest.raises(DataError, match="--num_proc must be a positive number"):
            prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "o"), progress=False, num_proc=bad)
    assert not (tmp_path / "o").exists()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_kill_9_under_a_process_pool_resumes_to_identical_output(tmp_path: Path, data_tokenizer: Path,
                                                                   shakespeare_jsonl: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("needs /proc/PID/task/PID/children (Linux)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def command(out: Path, num_proc: int) -> list[str]:
        settings = dict(data=[str(shakespeare_jsonl)], tokenizer=str(data_tokenizer), out=str(out), seq_len=SEQ,
                        shard_mb=0.002, tokenize_batch_chars=4000)
        return [sys.executable, "-c", "from data_pipeline.prepare import PrepareConfig, prepare; "
                f"prepare(PrepareConfig(**{settings!r}), progress=False, num_proc={num_proc})"]

    reference = tmp_path / "clean"
    subprocess.run(command(reference, 1), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out, 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal, workers, deadline = partial_dir(out) / JOURNAL, [], time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid) or workers
        if journal.exists() and len(journal.read_text().splitlines()) >= 4 and len(workers) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "prepare finished before it could be killed; give it more work"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{w}").exists() for w in workers)  # no worker outlives the killed prepare
    assert not (out / "manifest.json").exists()
    subprocess.run(command(out, 3), check=True, env=env, capture_output=True)  # another count: the same bytes
    assert shard_bytes(out) == shard_bytes(reference)
    assert load_manifest(out)["splits"] == load_manifest(reference)["splits"]


@pytest.mark.parametrize("crash_at", [2, 3], ids=["crash-before-val-commit", "crash-before-manifest"])
@pytest.mark.parametrize("cap_rows", [100, 700])
def test_max_tokens_keeps_the_first_rows_whatever_the_processes_or_a_crash(
        tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path, monkeypatch: pytest.MonkeyPatch,
        cap_rows: int, crash_at: int) -> None:
    cfg = dict(val=0.05, tokenize_batch_chars=10_000)  # 700 rows fill after many batches, read ahead by a pool
    full = prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "full", **cfg), progress=False, num_proc=1)
    cap = cap_rows * (SEQ + 1) - 7  # rounds up to cap_rows rows
    outs = []
    for n in (1, 2):
        manifest = prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / f"cap{n}", max_tokens=cap, **cfg),
                           progress=False, num_proc=n)
        outs.append((shard_bytes(tmp_path / f"cap{n}"), manifest["splits"]))
    assert outs[0] == outs[1]
    splits = outs[0][1]
    assert splits["train"]["rows"] == cap_rows < full["splits"]["train"]["rows"]
    assert (all_rows(tmp_path / "cap1") == all_rows(tmp_path / "full")[:cap_rows]).all()  # the uncapped run's first
    assert 0 < splits["val"]["rows"] < full["splits"]["val"]["rows"]  # validation stops at the same document
    with monkeypatch.context() as patch:
        crash_after_journal_entries(patch, crash_at)
        with pytest.raises(Crash):
            prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "crashed", max_tokens=cap, **cfg),
                    progress=False, num_proc=2)
    resumed = prepare(config(shakespeare_jsonl, data_tokenizer, tmp_path / "crashed", max_tokens=cap, **cfg),
                      progress=False, num_proc=1)
    assert shard_bytes(tmp_path / "crashed") == outs[0][0] and resumed["splits"] == splits
    with pytest.raises(DataError, match="--max_tokens must be a positive number"):
        config(shakespeare_jsonl, data_tokenizer, tmp_path / "bad", max_tokens=0)


def test_a_streamed_dataset_reads_like_its_files_and_stops_at_max_tokens(tmp_path: Path, data_tokenizer: Path,
                                                                         shakespeare_jsonl: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in shakespeare_jsonl.read_text().splitlines()]
    folder = tmp_path / "parquet"
    folder.mkdir()
    half = len(texts) // 2
    pq.write_table(pa.table({"text": texts[:half]}), folder / "part-0.parquet", row_group_size=500)
    pq.write_table(pa.table({"text": texts[half:]}), folder / "part-1.parquet", row_group_size=500)
    files = prepare(config(str(folder), data_tokenizer, tmp_path / "files"), progress=False)
    streamed = prepare(config(f"hf:{folder}", data_tokenizer, tmp_path / "streamed"), progress=False)
    assert streamed["sources"][0]["kind"] == "hf"
    assert (all_rows(tmp_path / "streamed") == all_rows(tmp_path / "files")).all()  # datasets' streaming path
    capped = prepare(config(f"hf:{folder}", data_tokenizer, tmp_path / "capped", max_tokens=20 * (SEQ + 1)),
                     progress=False)
    assert capped["splits"]["train"]["rows"] == 20
    assert capped["sources"][0]["documents"] < len(texts) // 20  # the stream was left unread after the cap


def test_the_hint_for_an_empty_validation_split_fits_the_sources(tmp_path: Path) -> None:
    """--sample_by concerns text files only: the hint used to name it for JSONL input too."""
    from data_pipeline.prepare import no_val_hint
    from data_pipeline.sources import resolve_sources

    (tmp_path / "a.txt").write_text("text\n")
    (tmp_path / "a.jsonl").write_text('{"text": "text"}\n')
    settings = PrepareConfig(data=["x"], tokenizer="t", out="o", val=0.01)
    assert "--sample_by paragraph" in no_val_hint(settings, resolve_sources(str(tmp_path / "a.txt")))
    jsonl = no_val_hint(settings, resolve_sources(str(tmp_path / "a.jsonl")))
    assert "--sample_by" not in jsonl and "--val" in jsonl
