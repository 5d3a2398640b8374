"""Hostile input to a resumed run: a config that drifted from its checkpoint's, other data, a trainer.json or
COMPLETE that lies. Identity changes are refused, always; on-purpose changes only when allowed, and then
logged. A refusal is one line listing each key old -> new, and changes nothing in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostile import cli, copy_dataset, edit_json, refused, snapshot, train_args
from tlm_base.fileio import sha256_file
from tlm.training.metrics import read_metrics


@pytest.fixture()
def stopped(tmp_path: Path, prepared: Path, capsys: pytest.CaptureFixture) -> Path:
    """A run of 8 steps stopped after step 4 (checkpoint at 4), as `--train.stop_at=4` leaves it."""
    run_dir = tmp_path / "run"
    status, _, err = cli(train_args(prepared, run_dir, **{"train.stop_at": 4}), capsys)
    assert status == 0, err
    return run_dir


DRIFT = {
    "norm": ({"model.norm": "layernorm"}, ["model.norm: \"rmsnorm\" -> \"layernorm\""]),
    "position": ({"model.position_embedding": "nope"}, ["model.position_embedding: \"rope\" -> \"nope\""]),
    "rope_theta": ({"model.rope_theta": 10}, ["model.rope_theta: 1000000.0 -> 10.0"]),
    "several": ({"model.norm_position": "post", "model.mlp": "silu"},
                ["model.intermediate_size: 192 -> 256", "model.norm_position: \"pre\" -> \"post\"", "model.mlp"]),
    "hidden size": ({"model.hidden_size": 128}, ["model.hidden_size: 64 -> 128"]),
    "seed": ({"train.seed": 1}, ["train.seed: 0 -> 1"]),
    "seq_len": ({"data.seq_len": 32}, ["data.seq_len: 64 -> 32"]),
}


@pytest.mark.parametrize("case", DRIFT)
def test_an_architecture_or_data_change_is_refused(prepared: Path, stopped: Path, case: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    overrides, expected = DRIFT[case]
    before = snapshot(stopped)
    line = refused(train_args(prepared, stopped, **overrides), capsys, f"cannot resume {stopped}/checkpoints/step-00000004",
                   *expected, "start a new run instead (--name=NEW_NAME or --logging.run_dir=NEW_FOLDER")
    assert "allow_change" not in line
    assert snapshot(stopped) == before


def test_an_identity_key_cannot_be_allowed(prepared: Path, stopped: Path, capsys: pytest.CaptureFixture) -> None:
    refused(train_args(prepared, stopped, **{"model.norm": "layernorm", "checkpoint.allow_change": "model.norm"}),
            capsys, "checkpoint.allow_change: 'model.norm' changes what the weights or the data mean")


@pytest.mark.parametrize("overrides, keys", [
    ({"optim.lr": 0.01}, "optim.lr"),
    ({"train.max_steps": 12, "batch.global_batch_size": 4}, "batch.global_batch_size,train.max_steps"),
    ({"train.precision": "bf16"}, "train.precision"),
    ({"eval.every": 2, "logging.log_every": 2}, "eval.every,logging.log_every"),
])
def test_an_on_purpose_change_needs_allowing(prepared: Path, stopped: Path, overrides: dict, keys: str,
                                             capsys: pytest.CaptureFixture) -> None:
    before = snapshot(stopped)
    refused(train_args(prepared, stopped, **overrides), capsys, "with a changed config",
            f"pass --checkpoint.allow_change={keys} (the change is logged)")
    assert snapshot(stopped) == before


def test_an_allowed_change_is_logged_everywhere(prepared: Path, stopped: Path, capsys: pytest.CaptureFixture,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        status, out, err = cli(train_args(prepared, stopped, **{"optim.lr": 0.002, "train.max_steps": 10,
                                                                "checkpoint.allow_change": "optim.lr,train.max_steps"}),
                               capsys)
    assert status == 0, err
    assert "resuming with changed settings (allowed): optim.lr: 0.001 -> 0.002; train.max_steps: 8 -> 10" in caplog.text
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 10 and summary["complete"]
    assert summary["config_changes"] == [{"step": 4, "changes": {"optim.lr": [0.001, 0.002], "train.max_steps": [8, 10]}}]
    change = [r for r in read_metrics(stopped / "metrics.jsonl") if "config_change" in r]
    assert [r.pop("time") > 0 for r in change] == [True]  # every line carries its wall-clock time
    assert change == [{"step": 4, "config_change": {"optim.lr": [0.001, 0.002], "train.max_steps": [8, 10]}}]
    trainer = json.loads((stopped / "checkpoints" / "step-00000010" / "trainer.json").read_text())
    assert trainer["config_changes"] == summary["config_changes"] and trainer["config"]["optim"]["lr"] == 0.002


def test_an_allowed_change_reaches_the_wandb_config(prepared: Path, stopped: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tlm.training.metrics import WandbLogger

    sent = []
    monkeypatch.setattr(WandbLogger, "update_config", lambda self, values: sent.append(values))
    status, _, err = cli(train_args(prepared, stopped, **{"optim.lr": 0.002, "checkpoint.allow_change": "optim.*"}),
                         capsys)
    assert status == 0, err
    assert sent == [{"config_changes": [{"step": 4, "changes": {"optim.lr": [0.001, 0.002]}}]}]


def test_free_keys_change_without_a_word(prepared: Path, stopped: Path, capsys: pytest.CaptureFixture,
                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        status, _, err = cli(train_args(prepared, stopped, **{"checkpoint.keep_last": 5, "logging.progress": "true",
                                                              "data.prefetch": 1}), capsys)
    assert status == 0 and "changed settings" not in caplog.text, err


def test_other_data_is_refused(tmp_path: Path, prepared: Path, stopped: Path, data_tokenizer: Path,
                               shakespeare_jsonl: Path, capsys: pytest.CaptureFixture) -> None:
    from data_pipeline.prepare import PrepareConfig, prepare

    other = tmp_path / "other"
    prepare(PrepareConfig(data=[str(shakespeare_jsonl)], tokenizer=str(data_tokenizer), out=str(other), seq_len=64,
                          val=0.10), progress=False)
    before = snapshot(stopped)
    refused(train_args(other, stopped), capsys, "the prepared data differs (fingerprint", "val: 0.05 -> 0.1")
    assert snapshot(stopped) == before


def test_the_same_data_moved_elsewhere_resumes(tmp_path: Path, prepared: Path, stopped: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    moved = copy_dataset(prepared, tmp_path / "moved")
    status, _, err = cli(train_args(moved, stopped), capsys)
    assert status == 0, err


def _reseal(checkpoint: Path) -> None:
    """Rewrite COMPLETE to match the files as they now are (a buggy writer, not a torn copy)."""
    manifest = json.loads((checkpoint / "COMPLETE").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = [(checkpoint / name).stat().st_size, sha256_file(checkpoint / name)]
    (checkpoint / "COMPLETE").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update(step="4"), "key 'step': input should be a valid integer"),
    (lambda t: t.pop("stream"), "key 'stream' is missing"),
    (lambda t: t.update(backend="megatron"), "key 'backend'"),
    (lambda t: t["stream"].update(consumed_samples=-8), "key 'stream.consumed_samples'"),
])
def test_a_trainer_json_that_lies_is_one_line(prepared: Path, stopped: Path, edit, message: str,
                                              capsys: pytest.CaptureFixture) -> None:
    checkpoint = stopped / "checkpoints" / "step-00000004"
    edit_json(checkpoint / "trainer.json", edit)
    _reseal(checkpoint)
    before = snapshot(stopped)
    refused(train_args(prepared, stopped), capsys, f"{checkpoint / 'trainer.json'}: {message}",
            "--checkpoint.resume=none")
    assert snapshot(stopped) == before


def test_a_complete_manifest_naming_a_file_outside_is_passed_over(prepared: Path, stopped: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    checkpoint = stopped / "checkpoints" / "step-00000004"
    edit_json(checkpoint / "COMPLETE", lambda m: m["files"].update({"../../../etc/passwd": [1, "0" * 64]}))
    refused(train_args(prepared, stopped), capsys, "no sound checkpoint", "COMPLETE manifest is unreadable",
            "must be a plain file name")


def test_a_latest_pointer_out_of_the_run_is_refused(stopped: Path) -> None:
    from tlm_base.errors import CheckpointError
    from tlm.checkpointing.layout import read_latest

    assert read_latest(stopped).name == "step-00000004"
    (stopped / "checkpoints" / "latest").write_text("../../../etc\n")
    with pytest.raises(CheckpointError, match="names '../../../etc', not a checkpoint of this run"):
        read_latest(stopped)
