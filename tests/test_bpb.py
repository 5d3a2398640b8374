"""Bits per byte: the byte count of each token, and the figure `tlm eval` reports for a tlm model and for the same
model exported to transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import TINYSHAKESPEARE
from data_pipeline.dataset import TokenRows
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.tokenizer_files import load_tokenizer, token_byte_lengths
from tlm.cli import main

TEXTS = ["plain ASCII, words and spaces", "Ünïcödé — “quotes”, 日本語 and 😀 split across tokens",
         "  leading spaces\n\n\ttabs\r\n and <|endoftext|> written as text"]


@pytest.mark.parametrize("which", ["data_tokenizer", "tokenizer_dir"])
def test_token_bytes_sum_to_the_utf8_bytes_of_the_text(which: str, request: pytest.FixtureRequest) -> None:
    tok = load_tokenizer(request.getfixturevalue(which))
    tok.encode_special_tokens = True  # as prepare reads text: a written '<|endoftext|>' is text
    lengths = token_byte_lengths(tok)
    assert lengths[tok.token_to_id("<|endoftext|>")] == 0  # a separator is no text
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    separated = tok.encode("one", add_special_tokens=False).ids + [tok.token_to_id("<|endoftext|>")]
    assert int(lengths[separated].sum()) == 3


def run_here(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    main([str(a) for a in args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_reports_bits_per_byte_for_tlm_and_its_transformers_export(tmp_path: Path, data_tokenizer: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model"
    run_here(["init", "--out", model, "--preset", "debug", "--tokenizer", data_tokenizer, "--initializer_range=0.3"],
             capsys)
    args = ["--data", TINYSHAKESPEARE, "--seq_len", "64", "--batch_size", "4", "--max_batches", "3"]
    ours = run_here(["eval", "--checkpoint", model, *args], capsys)
    assert ours["bits_per_byte"] == pytest.approx(ours["loss"] * ours["tokens"] / (math.log(2) * ours["bytes"]))

    # The bytes, counted independently: the text each evaluated row's targets decode to (tinyshakespeare is
    # ASCII, so no character is split between rows).
    prepare(PrepareConfig(data=[str(TINYSHAKESPEARE)], tokenizer=str(data_tokenizer), out=str(tmp_path / "rows"),
                          seq_len=64, val=0.0), progress=False)
    rows = TokenRows(tmp_path / "rows", "train")
    block, _ = rows.gather(np.arange(12))
    tok = load_tokenizer(data_tokenizer)
    assert ours["bytes"] == sum(len(tok.decode(row[1:].tolist(), skip_special_tokens=True).encode()) for row in block)
    assert ours["tokens"] == 12 * 64 and 2.0 < ours["bytes"] / ours["tokens"] < 6.0

    pytest.importorskip("transformers")
    run_here(["export", "--checkpoint", model, "--out", tmp_path / "hf"], capsys)
    theirs = run_here(["eval", "--checkpoint", tmp_path / "hf", *args], capsys)
    assert theirs["tokens"] == ours["tokens"] and theirs["bytes"] == ours["bytes"]
    assert theirs["loss"] == pytest.approx(ours["loss"], rel=1e-4)
    assert theirs["bits_per_byte"] == pytest.approx(ours["bits_per_byte"], rel=1e-4)
