"""`tlm tokenizer` and `tlm prepare` through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline import DEMO_VAL, TINYSHAKESPEARE
from data_pipeline.dataset import TokenRows
from test_cli import last_json, run
from tlm.cli import main


def run_here(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    main(args)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_tokenizer_then_prepare_through_the_installed_command(tmp_path: Path) -> None:
    tok = last_json(run("tokenizer", "--data", str(TINYSHAKESPEARE), "--out", str(tmp_path / "tok"), "--vocab_size", "800"))
    assert tok["vocab_size"] == 800 and tok["special_tokens"][0] == "<|endoftext|>"
    figures = last_json(run("prepare", "--data", str(TINYSHAKESPEARE), "--tokenizer", str(tmp_path / "tok"),
                            "--out", str(tmp_path / "data"), "--seq_len", "128", "--val_data", str(DEMO_VAL),
                            "--shard_mb", "0.1"))
    assert figures["splits"]["train"]["rows"] > 2000 and figures["splits"]["val"]["rows"] > 1000
    assert figures["tokens_per_s"] > 0 and not figures["reused"]
    assert len(TokenRows(tmp_path / "data")) == figures["splits"]["train"]["rows"]


def test_prepare_options(tmp_path: Path, data_tokenizer: Path, shakespeare_jsonl: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["prepare", "--data", str(shakespeare_jsonl), "--tokenizer", str(data_tokenizer), "--out", str(tmp_path / "np"),
            "--seq_len", "48", "--nopack", "--val", "50"]
    figures = run_here(args, capsys)
    assert figures["mode"] == "nopack" and figures["splits"]["val"]["documents"] == 50
    assert run_here(args, capsys)["reused"]
    for w in range(2):
        run_here(["prepare", "--data", str(shakespeare_jsonl), "--tokenizer", str(data_tokenizer),
                  "--out", str(tmp_path / "w"), "--seq_len", "48", "--num_workers", "2", "--worker_index", str(w)], capsys)
    merged = run_here(["prepare", "--merge", "--out", str(tmp_path / "w")], capsys)
    assert merged["splits"]["train"]["rows"] > 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["prepare", "--out", "{tmp}/o"], "give --tokenizer DIR"),
        (["prepare", "--out", "{tmp}/o", "--data", "{tmp}/missing.jsonl", "--tokenizer", "{tok}"], "does not exist"),
        (["prepare", "--out", "{tmp}/o", "--data", "{bad}", "--tokenizer", "{tok}"], "bad.jsonl:2: invalid JSON"),
        (["prepare", "--out", "{tmp}/o", "--data", "{bad}", "--tokenizer", "{tmp}"], "has no tokenizer.json"),
        (["prepare", "--out", "{tmp}/o", "--data", "{bad}", "--tokenizer", "{tok}", "--val", "2.0"], "fraction must be below 1"),
        (["prepare", "--merge", "--out", "{tmp}"], "holds no worker-I-of-N folders"),
        (["tokenizer", "--data", "{bad}", "--out", "{tmp}/t"], "bad.jsonl:2: invalid JSON"),
        (["tokenizer", "--data", "{tmp}/nothing-here", "--out", "{tmp}/t"], "does not exist"),
    ],
)
def test_data_errors_are_one_line(tmp_path: Path, data_tokenizer: Path, args: list[str], message: str,
                                  capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    values = {"tmp": str(tmp_path), "tok": str(data_tokenizer), "bad": str(bad)}
    with pytest.raises(SystemExit) as info:
        main([a.format(**values) for a in args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("tlm: error: ") and message in err
