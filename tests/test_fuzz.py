"""The data pipeline under a fuzzer: random bytes in every format, mutated JSON lines, deeply nested and
wrong-typed JSON, truncated compressed files, a 100 MB line, tampered shards. Each input ends in a clean
read, a counted skip, or a DataError that names the file; never a hang, never another exception."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from data_pipeline.dataset import TokenRows
from data_pipeline.documents import DocumentReader
from data_pipeline.sources import resolve_sources
from tlm_base.errors import DataError
from tlm_base.errors import TLMError

SEED = int(os.environ.get("TLM_FUZZ_SEED", "0"))
ROUNDS = int(os.environ.get("TLM_FUZZ_ROUNDS", "60"))
COMPRESS = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress,
            ".zst": lambda data: zstandard.ZstdCompressor().compress(data)}


class Hang(Exception):
    pass


def read_all(path: Path, on_error: str, limit_s: int = 30) -> tuple[int, int]:
    """(documents, skips) from reading `path` to the end; raises Hang past `limit_s`."""
    def alarm(*_):
        raise Hang(f"{path.name}: no result after {limit_s} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(limit_s)
    try:
        reader = DocumentReader(resolve_sources(str(path)), on_error=on_error)
        documents = sum(1 for _ in reader.documents())
        return documents, reader.skips.total()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check(path: Path) -> str:
    """Read under both error policies; the outcome, or an AssertionError for a forbidden one."""
    outcomes = []
    for policy in ("raise", "skip"):
        try:
            documents, skips = read_all(path, policy)
            outcomes.append(f"{policy}: {documents} docs, {skips} skipped")
        except DataError as e:
            assert path.name in str(e), f"the error does not name the file: {e}"
            assert str(e).strip() and "\n" not in str(e).strip(), f"not one clear line: {e!r}"
            outcomes.append(f"{policy}: DataError")
    return "; ".join(outcomes)


def valid_jsonl(rng: random.Random, lines: int = 20) -> bytes:
    words = ["the", "king", "of", "Denmark", "said", "ünïcødé", "\u2014", "night", "\t", "\\n"]
    return b"".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 30))),
                                "id": i}).encode() + b"\n" for i in range(lines))


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        at = rng.randrange(len(data) + 1)
        if op < 0.4 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op < 0.7:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            del data[at:at + rng.randint(1, 32)]
    return bytes(data)


def fuzz_cases(root: Path, rng: random.Random) -> list[Path]:
    cases = []

    def write(name: str, data: bytes) -> None:
        path = root / f"{len(cases):03d}-{name}"
        path.write_bytes(data)
        cases.append(path)

    for _ in range(ROUNDS):
        kind = rng.choice(["random", "mutated", "compressed-random", "truncated", "mutated-compressed"])
        if kind == "random":
            ext = rng.choice([".jsonl", ".json", ".txt", ".csv", ".tsv", ".parquet"])
            write(f"random{ext}", os.urandom(rng.randint(0, 4096)))
        elif kind == "mutated":
            write("mutated.jsonl", mutate(valid_jsonl(rng), rng))
        elif kind == "compressed-random":
            write(f"random.jsonl{rng.choice(list(COMPRESS))}", os.urandom(rng.randint(0, 2048)))
        elif kind == "truncated":
            ext = rng.choice(list(COMPRESS))
            packed = COMPRESS[ext](valid_jsonl(rng, 200))
            write(f"truncated.jsonl{ext}", packed[:rng.randint(1, len(packed) - 1)])
        else:
            ext = rng.choice(list(COMPRESS))
            write(f"mutated.jsonl{ext}", mutate(COMPRESS[ext](valid_jsonl(rng, 50)), rng))
    depth = 200_000
    write("nested.jsonl", b'{"text": ' + b"[" * depth + b"]" * depth + b"}\n")
    write("nested-object.json", b'{"a":' * depth + b"1" + b"}" * depth)
    for i, record in enumerate([5, None, ["a"], {"x": 1}, "text", [{"text": 1}], {"text": {"text": "a"}}]):
        write(f"typed-{i}.jsonl", json.dumps({"text": "fine"}).encode() + b"\n" + json.dumps(record).encode() + b"\n")
    write("empty.jsonl", b"")
    write("blank.txt", b"\n\n  \n")
    write("latin1.txt", "caf\u00e9 na\u00efve".encode("latin-1"))
    return cases


def test_fuzzed_inputs_end_cleanly(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    outcomes = {}
    for path in fuzz_cases(tmp_path, rng):
        outcomes[path.name] = check(path)  # raises for a hang or an unexpected exception
    assert len(outcomes) >= ROUNDS + 10
    named = {name.split("-", 1)[1]: outcome for name, outcome in outcomes.items()}
    assert named["empty.jsonl"] == "raise: DataError; skip: 0 docs, 1 skipped"
    assert named["typed-0.jsonl"] == "raise: DataError; skip: 1 docs, 1 skipped"  # {"text": 5} skipped, counted
    assert named["nested.jsonl"].startswith("raise: DataError")
    assert sum("DataError" in o for o in outcomes.values()) > ROUNDS // 2  # the noise was noticed, not read as text


def test_a_100_mb_line_is_read_in_bounded_pieces(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    line = ("All the world's a stage, and all the men and women merely players. " * 1_500_000)[:100_000_000]
    path.write_text(json.dumps({"text": line}) + "\n", encoding="utf-8")
    start = time.perf_counter()
    reader = DocumentReader(resolve_sources(str(path)))
    longest = pieces = 0
    for document in reader.documents():
        pieces += 1
        longest = max(longest, len(document.text))
    assert pieces > 100 and longest <= 2 * reader.piece_chars  # memory bounded by the piece, not the line
    assert time.perf_counter() - start < 120


def test_the_cli_reports_a_fuzzed_file_in_one_line(tmp_path: Path, data_tokenizer: Path) -> None:
    rng = random.Random(SEED)
    bad = tmp_path / "bad.jsonl.zst"
    packed = zstandard.ZstdCompressor().compress(valid_jsonl(rng, 500))
    bad.write_bytes(packed[: len(packed) // 2])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "tlm", "prepare", "--data", str(bad), "--tokenizer",
                             str(data_tokenizer), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.jsonl.zst" in result.stderr and "truncated" in result.stderr, result.stderr[-1000:]
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("tamper", ["flip", "truncate", "append", "manifest", "missing"])
def test_tampered_shards_are_refused(tmp_path: Path, prepared: Path, tamper: str) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    shard = data / "train-00000.arrow"
    raw = bytearray(shard.read_bytes())
    if tamper == "flip":
        raw[len(raw) // 2] ^= 0xFF
        shard.write_bytes(bytes(raw))
    elif tamper == "truncate":
        shard.write_bytes(bytes(raw[: len(raw) // 3]))
    elif tamper == "append":
        shard.write_bytes(bytes(raw) + b"\0" * 64)
    elif tamper == "manifest":
        (data / "manifest.json").write_text((data / "manifest.json").read_text()[:-40])
    else:
        shard.unlink()
    with pytest.raises(TLMError) as error:
        rows = TokenRows(data, "train", verify="sha256")
        rows[0]
    message = str(error.value)
    assert ("train-00000.arrow" in message or "manifest.json" in message) and "\n" not in message.strip(), message
