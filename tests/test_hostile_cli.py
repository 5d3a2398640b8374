"""The CLI contract under hostile command lines: a user error is one `tlm: error:` line and exit 2 before any
work (stray arguments, values out of range, a generation past the context, non-regular files); Ctrl-C
outside training is one line and 130; a bug still shows its traceback, and TLM_DEBUG=1 shows it for user
errors too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hostile import call_main, child, cli, refused, train_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> Path:
    """The model folder of a 2-step run at seq_len 64 (its tlm_config.json records the trained length)."""
    run_dir = tmp_path_factory.mktemp("hostile-cli") / "run"
    assert call_main(train_args(prepared, run_dir, **{"train.max_steps": 2})) == 0
    return run_dir / "checkpoints" / "step-00000002" / "model"


def gen(model: Path, *extra: str) -> list[str]:
    return ["generate", "--checkpoint", model, "--prompt_ids", "[1, 2, 3]", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-1"], "--temperature must be >= 0, got -1"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--top_p", "0"], "--top_p must be in (0, 1], got 0"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1], got 1.5"),
    (["--top_k", "-3"], "--top_k must be at least 0, got -3"),
    (["--max_new_tokens", "1e8"], "--max_new_tokens must be a whole number, got 100000000.0"),
    (["--max_new_tokens", "-5"], "--max_new_tokens must be at least 1, got -5"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1, got 0"),
    (["--max_new_tokens", "100000000"], "= 100000003 exceeds the model's context of 2048 (max_position_embeddings)"),
    (["--seed", "-1"], "--seed must be at least 0"),
])
def test_sampling_values_out_of_range(trained: Path, extra: list[str], message: str,
                                      capsys: pytest.CaptureFixture) -> None:
    refused(gen(trained, *extra), capsys, message)


def test_past_the_trained_length_a_warning_names_yarn(trained: Path, capsys: pytest.CaptureFixture,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        status, out, err = cli(gen(trained, "--max_new_tokens", "100"), capsys)
    assert status == 0, err
    assert "past the 64 this model was trained at" in caplog.text and "--rope_scaling yarn:2:64" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        status, out, err = cli(gen(trained, "--max_new_tokens", "100", "--rope_scaling", "yarn:2:64"), capsys)
    assert status == 0 and "past the" not in caplog.text, err


def test_a_stray_argument_is_refused_before_training(tmp_path: Path, prepared: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    refused([*train_args(prepared, run_dir), "extra"], capsys, "tlm train: unexpected argument 'extra'")
    refused(["train", "configs/debug.yaml"], capsys, "unexpected argument 'configs/debug.yaml'; did you mean --config "
                                                     "configs/debug.yaml?")
    assert not run_dir.exists()


def test_a_switch_given_a_value_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    refused(["init", "--out", tmp_path / "m", "--preset", "debug", "--overwrite", "please"], capsys,
            "--overwrite is a switch and takes no value (got 'please')")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("extra, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--max_batches", "0"], "--max_batches must be at least 1, got 0"),
    (["--seq_len", "2.5"], "--seq_len must be a whole number"),
])
def test_eval_values_out_of_range(trained: Path, prepared: Path, extra: list[str], message: str,
                                  capsys: pytest.CaptureFixture) -> None:
    refused(["eval", "--checkpoint", trained, "--data", prepared, *extra], capsys, message)


@pytest.mark.parametrize("override, message", [
    ("--optim.lr=nan", "config key 'optim.lr' must be positive, got nan"),
    ("--optim.betas=[0.9, 1.5]", "config key 'optim.betas' must be two numbers in [0, 1)"),
    ("--checkpoint.allow_change=optim.lrr", "checkpoint.allow_change: 'optim.lrr' names no config key"),
    ("--eval.max_batches=0", "config key 'eval.max_batches' must be positive"),
])
def test_train_values_out_of_range(tmp_path: Path, prepared: Path, override: str, message: str,
                                   capsys: pytest.CaptureFixture) -> None:
    refused([*train_args(prepared, tmp_path / "run"), override], capsys, message)
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    refused(["train", "--config", fifo], capsys, f"config file '{fifo}' is not a regular file")


def test_tlm_debug_shows_the_traceback_of_a_user_error(tmp_path: Path) -> None:
    proc = child(["generate", "--checkpoint", tmp_path / "missing", "--prompt_ids", "[1]"], env={"TLM_DEBUG": "1"})
    assert proc.wait(120) == 2
    err = proc.stderr.read()
    assert "Traceback (most recent call last)" in err and "CheckpointError" in err
    assert err.strip().splitlines()[-1] == f"tlm: error: checkpoint '{tmp_path / 'missing'}' does not exist"


def test_a_bug_still_shows_its_traceback(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tlm.model.generate
    from tlm.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in tlm")

    monkeypatch.setattr(tlm.model.generate, "generate", broken)
    with pytest.raises(RuntimeError, match="a bug in tlm"):
        main(["generate", "--checkpoint", str(trained), "--prompt_ids", "[1]"])


def test_ctrl_c_outside_training_is_one_line(trained: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    import tlm.model.generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tlm.model.generate, "generate", interrupted)
    status, _, err = cli(gen(trained), capsys)
    assert status == 130 and err.strip().splitlines()[-1] == "tlm: interrupted" and "Traceback" not in err


def test_sound_values_still_work(trained: Path, capsys: pytest.CaptureFixture) -> None:
    status, out, err = cli(gen(trained, "--max_new_tokens", "5", "--temperature", "0.8", "--top_p", "0.9", "--top_k",
                               "20"), capsys)
    assert status == 0, err
    assert len(json.loads(out.strip().splitlines()[-1])["new_token_ids"][0]) == 5
