"""Hostile input: a prepared dataset (manifest.json and its shards) that lies. Every case goes through the real
CLI (`tlm eval`, `tlm train`) and must end in one `tlm: error:` line, exit status 2, before any work, with the
dataset folder unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline.shards import shard_schema
from hostile import cli, copy_dataset, edit_json, refused, snapshot, train_args
from tlm_base.fileio import sha256_file


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, data_tokenizer: Path) -> Path:
    out = tmp_path_factory.mktemp("hostile-model") / "m"
    from tlm.cli import main

    main(["init", "--out", str(out), "--preset", "debug", "--tokenizer", str(data_tokenizer)])
    return out


def evaluate(data: Path, model: Path) -> list[str]:
    return ["eval", "--checkpoint", model, "--data", data, "--max_batches", "1", "--batch_size", "2"]


MANIFEST_CASES = {
    "row_length edited": (lambda m: m.update(row_length=129), "row_length 129 is not seq_len + 1 (65)"),
    "seq_len edited": (lambda m: m.update(seq_len=128), "row_length 65 is not seq_len + 1 (129)"),
    "shard outside the folder": (lambda m: m["splits"]["train"]["shards"][0].update(file="../../etc/passwd"),
                                 "key 'splits.train.shards.0.file': must be a plain file name"),
    "absolute shard path": (lambda m: m["splits"]["train"]["shards"][0].update(file="/etc/passwd"),
                            "key 'splits.train.shards.0.file'"),
    "missing key": (lambda m: m.pop("mode"), "key 'mode' is missing"),
    "wrong type": (lambda m: m["splits"]["train"]["shards"][0].update(rows="1024"),
                   "key 'splits.train.shards.0.rows': input should be a valid integer"),
    "val rows without shards": (lambda m: m["splits"]["val"].update(shards=[]), "splits.val"),
    "negative row count": (lambda m: m["splits"]["val"].update(rows=-1), "key 'splits.val.rows'"),
    "string format_version": (lambda m: m.update(format_version="1"), "key 'format_version': input should be a valid integer"),
    "newer format_version": (lambda m: m.update(format_version=99), "format_version 99 is newer than this tlm reads"),
    "dtype against the vocabulary": (lambda m: m.update(dtype="uint32"), "dtype uint32 does not fit a vocabulary of 1000"),
    "not JSON": (lambda m: "{not json", "not valid JSON"),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_a_manifest_that_lies_is_refused(tmp_path: Path, prepared: Path, model: Path, case: str,
                                         capsys: pytest.CaptureFixture) -> None:
    data = copy_dataset(prepared, tmp_path / "data")
    edit, message = MANIFEST_CASES[case]
    if case == "not JSON":
        (data / "manifest.json").write_text("{not json")
    else:
        edit_json(data / "manifest.json", edit)
    before = snapshot(data)
    refused(evaluate(data, model), capsys, str(data / "manifest.json") if case != "newer format_version" else "", message)
    assert snapshot(data) == before


def test_seq_len_and_row_length_edited_together_disagree_with_the_shards(tmp_path: Path, prepared: Path, model: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    data = copy_dataset(prepared, tmp_path / "data")
    edit_json(data / "manifest.json", lambda m: m.update(seq_len=32, row_length=33))
    refused(evaluate(data, model), capsys, "its Arrow schema (input_ids: fixed_size_list<item: uint16>[65])",
            "is not the one the manifest describes")


def test_a_shard_symlinked_out_of_the_folder_is_refused(tmp_path: Path, prepared: Path, model: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    data = copy_dataset(prepared, tmp_path / "data")
    outside = tmp_path / "elsewhere.arrow"
    shard = data / "val-00000.arrow"
    shard.rename(outside)
    shard.symlink_to(outside)
    refused(evaluate(data, model), capsys, "val-00000.arrow' resolves outside")


def _rewrite_shard(data: Path, split: str, high: int) -> Path:
    """Replace the split's first shard by one whose last token is `high`, with a manifest entry that agrees
    (bytes, sha256, rows): what a buggy or foreign writer would leave behind."""
    import json

    manifest = json.loads((data / "manifest.json").read_text())
    entry = manifest["splits"][split]["shards"][0]
    path = data / entry["file"]
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    ids = np.array(table.column("input_ids").combine_chunks().values.to_numpy(), dtype=np.uint16)
    ids[-1] = high
    schema = shard_schema(manifest["row_length"], np.dtype(np.uint16), True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.FixedSizeListArray.from_arrays(pa.array(ids), manifest["row_length"])],
                                           schema=schema))
    entry.update(bytes=path.stat().st_size, sha256=sha256_file(path), max_token_id=high)
    (data / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_token_ids_past_the_tokenizer_are_refused_before_step_1(tmp_path: Path, prepared: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """ids between the tokenizer's vocabulary (1000) and the model's (6400) used to train silently; the run
    is refused naming the shard, before any step (no metrics, no checkpoint)."""
    data = copy_dataset(prepared, tmp_path / "data")
    shard = _rewrite_shard(data, "train", 5000)
    run_dir = tmp_path / "run"
    refused(train_args(data, run_dir), capsys, f"{shard}: holds token id 5000, outside its tokenizer's vocabulary of 1000")
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_a_manifest_that_understates_the_largest_id_is_caught(tmp_path: Path, prepared: Path, model: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    data = copy_dataset(prepared, tmp_path / "data")
    shard = _rewrite_shard(data, "val", 999)
    edit_json(data / "manifest.json", lambda m: m["splits"]["val"]["shards"][0].update(max_token_id=5))
    refused(evaluate(data, model), capsys, f"{shard}: its largest token id is 999, the manifest says 5")


def test_shards_record_their_largest_token_id(prepared: Path) -> None:
    from data_pipeline.dataset import TokenRows

    rows = TokenRows(prepared, "train")
    for shard in rows.manifest["splits"]["train"]["shards"]:
        assert shard["max_token_id"] == rows.max_token_ids[shard["file"]] > 0


def test_non_regular_data_files_are_named_as_such(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture) -> None:
    import os

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    refused(["eval", "--checkpoint", model, "--data", "/dev/zero"], capsys, "'/dev/zero' is not a regular file or folder",
            "a character device")
    refused(["eval", "--checkpoint", model, "--data", fifo], capsys, "is not a regular file or folder (a FIFO)")


def test_a_sound_dataset_still_evaluates(prepared: Path, model: Path, capsys: pytest.CaptureFixture) -> None:
    status, out, err = cli(evaluate(prepared, model), capsys)
    assert status == 0, err
