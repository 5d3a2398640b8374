"""Sources: every format and compression, and every kind of bad input (raise names it, skip counts it)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest

from data_pipeline.documents import DocumentReader
from data_pipeline.sources import resolve_sources
from tlm_base.errors import DataError

DOCS = [f"Document number {i}.\nIt has two lines." for i in range(7)]
JSONL = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(DOCS)).encode()


def read(spec, **kwargs) -> tuple[list[str], DocumentReader]:
    reader = DocumentReader(resolve_sources(spec), **kwargs)
    return [d.text for d in reader.documents()], reader


@pytest.mark.parametrize(
    "name, writer",
    [
        ("c.jsonl", lambda p: p.write_bytes(JSONL)),
        ("c.jsonl.gz", lambda p: p.write_bytes(gzip.compress(JSONL))),
        ("c.jsonl.xz", lambda p: p.write_bytes(lzma.compress(JSONL))),
        ("c.jsonl.bz2", lambda p: p.write_bytes(bz2.compress(JSONL))),
        ("c.jsonl.zst", lambda p: p.write_bytes(__import__("zstandard").ZstdCompressor().compress(JSONL))),
        ("c.json", lambda p: p.write_text(json.dumps([{"text": t} for t in DOCS]))),
        ("c.ndjson", lambda p: p.write_bytes(JSONL)),
        ("c.csv", lambda p: p.write_text("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(DOCS)))),
        ("c.tsv.gz", lambda p: p.write_bytes(gzip.compress(("text\n" + "".join(t.replace("\n", " ") + "\n" for t in DOCS)).encode()))),
    ],
)
def test_every_format_gives_the_documents(tmp_path: Path, name: str, writer) -> None:
    writer(tmp_path / name)
    texts, reader = read(str(tmp_path / name))
    expected = [t.replace("\n", " ") for t in DOCS] if name.startswith("c.tsv") else DOCS
    assert texts == expected
    assert reader.skips.total() == 0


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": DOCS, "n": list(range(7))}), tmp_path / "c.parquet", row_group_size=3)
    assert read(str(tmp_path / "c.parquet"), text_field="content")[0] == DOCS
    with pytest.raises(DataError, match=r"c.parquet: no column 'text' \(columns: content, n\)"):
        read(str(tmp_path / "c.parquet"))


def test_text_files_by_document_paragraph_and_line(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("First line.\nSecond line.\n\nNew paragraph.\n")
    assert read(str(tmp_path / "t.txt"))[0] == ["First line.\nSecond line.\n\nNew paragraph.\n"]
    assert read(str(tmp_path / "t.txt"), sample_by="paragraph")[0] == ["First line.\nSecond line.", "New paragraph."]
    assert read(str(tmp_path / "t.txt"), sample_by="line")[0] == ["First line.", "Second line.", "New paragraph."]


def test_a_large_text_file_comes_in_pieces_that_rejoin(tmp_path: Path, shakespeare_text: str) -> None:
    (tmp_path / "big.txt").write_text(shakespeare_text)
    reader = DocumentReader(resolve_sources(str(tmp_path / "big.txt")), piece_chars=50_000)
    pieces = list(reader.documents())
    assert len(pieces) > 10 and [p.final for p in pieces].count(True) == 1 and pieces[-1].final
    assert "".join(p.text for p in pieces) == shakespeare_text
    assert max(len(p.text) for p in pieces) < 100_000


def test_folders_globs_and_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.jsonl").write_bytes(JSONL)
    (tmp_path / "sub" / "a.jsonl.gz").write_bytes(gzip.compress(JSONL))
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")  # not a text format: ignored inside a folder
    (tmp_path / ".hidden.jsonl").write_bytes(JSONL)
    sources = resolve_sources(str(tmp_path))
    assert [Path(s.path).name for s in sources] == ["b.jsonl", "a.jsonl.gz"]
    assert [Path(s.path).name for s in resolve_sources(str(tmp_path / "**" / "*.jsonl*"))] == ["b.jsonl", "a.jsonl.gz"]
    assert len(read([str(tmp_path / "b.jsonl"), str(tmp_path / "b.jsonl")])[0]) == 14


def test_saved_hugging_face_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    assert read(str(tmp_path / "saved"))[0] == DOCS


BAD_LINES = [
    (b'{"text": "good one"}\n{"text": "broken\n', "invalid JSON", "invalid_json"),
    (b'{"text": "good one"}\n{"title": "no text"}\n', "no field 'text' (fields: title)", "missing_field"),
    (b'{"text": "good one"}\n{"text": 42}\n', "field 'text' is int, not a string", "not_a_string"),
    (b'{"text": "good one"}\n{"text": null}\n', "field 'text' is NoneType, not a string", "not_a_string"),
    (b'{"text": "good one"}\n["a", "list"]\n', "expected a JSON object", "not_an_object"),
    (b'{"text": "good one"}\n{"text": "caf\xe9"}\n', "not UTF-8 (byte 0xe9 at column 14)", "not_utf8"),
    (b'{"text": "good one"}\n' + b"[" * 100000 + b"\n", "invalid JSON", "invalid_json"),
]


@pytest.mark.parametrize("content, message, reason", BAD_LINES, ids=[r for _, _, r in BAD_LINES[:-1]] + ["deep_nesting"])
def test_bad_records_name_file_and_line_or_are_counted(tmp_path: Path, content: bytes, message: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content + b'{"text": "after"}\n')
    with pytest.raises(DataError) as info:
        read(str(path))
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value)
    texts, reader = read(str(path), on_error="skip")
    assert texts == ["good one", "after"]  # nothing else lost
    assert reader.skips.counts == {reason: 1}
    assert f"{path}:2" in reader.skips.examples[reason][0]


def test_empty_file_and_zero_documents(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.jsonl: no documents \(the file is empty"):
        read(str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.txt").write_text("")
    texts, reader = read([str(tmp_path / "empty.jsonl"), str(tmp_path / "blank.txt")], on_error="skip")
    assert texts == [] and reader.skips.counts == {"empty_file": 2}
    (tmp_path / "empties.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    texts, reader = read(str(tmp_path / "empties.jsonl"), on_error="skip")
    assert reader.skips.counts == {"empty_text": 2, "empty_file": 1}


def test_truncated_compressed_file(tmp_path: Path) -> None:
    data = b"".join(json.dumps({"text": f"doc {i} " * 20}).encode() + b"\n" for i in range(3000))
    compressed = gzip.compress(data)
    (tmp_path / "cut.jsonl.gz").write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: corrupt or truncated gzip data after line \d+"):
        read(str(tmp_path / "cut.jsonl.gz"))
    texts, reader = read(str(tmp_path / "cut.jsonl.gz"), on_error="skip")
    assert 0 < len(texts) < 3000 and reader.skips.counts["corrupt_file"] == 1


def test_missing_paths_and_unreadable_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data source .*nothing.jsonl' does not exist"):
        resolve_sources(str(tmp_path / "nothing.jsonl"))
    with pytest.raises(DataError, match="no file matches"):
        resolve_sources(str(tmp_path / "*.jsonl"))
    (tmp_path / "pdfs").mkdir()
    (tmp_path / "pdfs" / "a.pdf").write_bytes(b"%PDF")
    with pytest.raises(DataError, match="folder .*pdfs' holds no readable files"):
        resolve_sources(str(tmp_path / "pdfs"))
    with pytest.raises(DataError, match="unknown file type '.pdf'"):
        resolve_sources(str(tmp_path / "pdfs" / "a.pdf"))


def test_a_dataset_name_that_is_not_available_offline() -> None:
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="dataset 'tlm-no-such-org/no-such-dataset' cannot be loaded"):
        read("tlm-no-such-org/no-such-dataset")


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(DataError, match="on_error must be"):
        DocumentReader([], on_error="ignore")
