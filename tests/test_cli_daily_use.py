"""Daily use through the CLI, as a new user meets it: help, version, the resolved config, what a terminal shows
during training, honest figures, validation that must not vanish silently, and refusals before any work."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostile import REPO, call_main, child, cli, refused, train_args
from tlm.training.metrics import read_metrics
from tlm.model.config import get_preset
from tlm.training.config import load_config


def test_help_is_tlms_own_and_needs_no_torch() -> None:
    code = ("import sys; from tlm.cli import main; main(['prepare', '--help']); main(['--help']); main(['--version']);"
            " print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PAGER": "less"})
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert out.startswith("usage: tlm prepare --out OUT [flags]") and "--val_data VAL_DATA" in out
    assert "Type:" not in out and "NAME" not in out.split("\n")[0]  # none of fire's help layout
    assert "commands:" in out and "train " in out and "tlm 0.1.0" in out
    assert out.strip().splitlines()[-1] == "False"  # no torch for help, version, or the data commands


def test_train_help_lists_the_config_keys_and_show_config_prints_them(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    status, out, _ = cli(["train", "--help"], capsys)
    assert status == 0 and "optim: name=adamw, lr=0.0005, betas=[0.9,0.999]" in out
    assert "checkpoint: every=500, keep_last=2, resume=auto, overwrite=false, allow_change=null" in out
    status, out, _ = cli(["train", "--config", REPO / "configs" / "debug.yaml", "--show_config", "--optim.lr=0.002"],
                         capsys)
    import yaml

    shown = yaml.safe_load(out)
    assert status == 0 and shown["optim"]["lr"] == 0.002 and shown["train"]["backend"] == "single"
    assert shown["model"] == get_preset("debug").to_dict() and "allow_change" in shown["checkpoint"]  # resolved
    (tmp_path / "shown.yaml").write_text(out)  # and it reads back to the same config
    assert load_config(tmp_path / "shown.yaml") == load_config(REPO / "configs" / "debug.yaml", {"optim.lr": 0.002})


def test_a_terminal_shows_validation_above_the_progress_bar(tmp_path: Path, prepared: Path) -> None:
    """On a tty the bar starts after the header, and validation losses are printed above it (they used to be
    shown only without a terminal)."""
    master, slave = pty.openpty()
    args = [sys.executable, "-m", "tlm", *map(str, train_args(prepared, tmp_path / "run", **{"train.max_steps": 8,
                                                                                            "logging.progress": "true"}))]
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            close_fds=True)
    os.close(slave)
    output, deadline = b"", time.time() + 180
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    proc.wait(30)
    os.close(master)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    header = text.index("training debug:")
    assert "step 4: val loss" in text and "over 512 tokens" in text
    assert "it/s" in text or "step/s" in text or "s/step" in text  # the bar was drawn
    assert text.index("step 4: val loss") > header and text[:header].count("%|") == 0  # no bar before the header


def test_the_summary_rate_is_the_runs_average(tmp_path: Path, prepared: Path, capsys: pytest.CaptureFixture) -> None:
    status, out, err = cli(train_args(prepared, tmp_path / "run", **{"train.max_steps": 6}), capsys)
    assert status == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    windows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    seconds = sum(r["step_time"] for r in windows)  # one step per window (log_every 1)
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens_seen"] / seconds, rel=1e-6)
    assert summary["recent_tokens_per_s"] == windows[-1]["tokens_per_s"]


def test_validation_that_would_vanish_is_said(tmp_path: Path, data_tokenizer: Path, capsys: pytest.CaptureFixture,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Two text files read one document each: --val 0.01 holds none out; prepare says so, and so does training."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(2):
        (texts / f"book{i}.txt").write_text(("A line of a book, long enough to make rows. " * 40 + "\n") * 20)
    out = tmp_path / "data"
    with caplog.at_level("WARNING"):
        status, _, err = cli(["prepare", "--out", out, "--data", texts, "--tokenizer", data_tokenizer, "--seq_len", "64",
                              "--val", "0.01"], capsys)
    assert status == 0, err
    assert "validation was asked for (--val 0.01) but got no rows" in caplog.text and "--sample_by paragraph" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        status, _, err = cli(train_args(out, tmp_path / "run", **{"train.max_steps": 2}), capsys)
    assert status == 0, err
    assert "has no validation rows: this run logs no validation loss" in caplog.text


def test_a_file_beside_its_compressed_copy_is_named(tmp_path: Path, data_tokenizer: Path, capsys: pytest.CaptureFixture,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    import lzma

    texts = tmp_path / "texts"
    texts.mkdir()
    body = ("Some words of a text. " * 50 + "\n\n") * 20
    (texts / "x.txt").write_text(body)
    (texts / "x.txt.xz").write_bytes(lzma.compress(body.encode()))
    with caplog.at_level("WARNING"):
        status, _, err = cli(["prepare", "--out", tmp_path / "data", "--data", texts, "--tokenizer", data_tokenizer,
                              "--seq_len", "64", "--val", "0"], capsys)
    assert status == 0, err
    assert f"{texts / 'x.txt'} and {texts / 'x.txt.xz'} are both read" in caplog.text


def test_figures_that_used_to_mislead(tmp_path: Path, data_tokenizer: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "five.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Book {i}. " + "words " * (30 + i)}) + "\n" for i in range(5)))
    status, out, err = cli(["prepare", "--out", tmp_path / "data", "--data", corpus, "--tokenizer", data_tokenizer,
                            "--seq_len", "16", "--val", "0"], capsys)
    assert status == 0, err
    assert json.loads(out.strip().splitlines()[-1])["splits"]["train"]["documents"] == 5  # not 4 (the cut tail)
    status, out, err = cli(["tokenizer", "--out", tmp_path / "tok", "--data", corpus, "--vocab_size", "300"], capsys)
    assert status == 0 and json.loads(out.strip().splitlines()[-1])["documents"] == 5, err
    for worker in range(2):
        status, _, err = cli(["prepare", "--out", tmp_path / "w", "--data", corpus, "--tokenizer", data_tokenizer,
                              "--seq_len", "16", "--val", "0", "--num_workers", "2", "--worker_index", str(worker)], capsys)
        assert status == 0, err
    status, out, err = cli(["prepare", "--out", tmp_path / "w", "--merge"], capsys)
    figures = json.loads(out.strip().splitlines()[-1])
    assert status == 0 and figures["tokens_per_s"] is None and figures["mb_per_s"] is None, err


def test_eval_on_raw_text_uses_the_trained_length(tmp_path: Path, prepared: Path, capsys: pytest.CaptureFixture) -> None:
    assert call_main(train_args(prepared, tmp_path / "run", **{"train.max_steps": 2})) == 0
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 200)
    status, out, err = cli(["eval", "--checkpoint", tmp_path / "run" / "checkpoints" / "step-00000002" / "model",
                            "--data", text], capsys)
    result = json.loads(out.strip().splitlines()[-1])
    assert status == 0 and result["seq_len"] == 64 and result["split"] == "raw text", err


def test_a_zero_stage_without_deepspeed_is_refused(tmp_path: Path, prepared: Path, capsys: pytest.CaptureFixture) -> None:
    refused([*train_args(prepared, tmp_path / "run"), "--train.zero_stage=2"], capsys,
            "--train.zero_stage=2 is given but train.backend is 'single'", "--train.backend=deepspeed")
    assert not (tmp_path / "run").exists()


def test_the_deepspeed_op_build_is_announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    from tlm.training.backends.zero import _announce_shm_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level("INFO"):
        _announce_shm_build()
    assert "builds its shared-memory communication op on first use" in caplog.text and str(tmp_path) in caplog.text
    (tmp_path / "py311_cpu" / "deepspeed_shm_comm").mkdir(parents=True)
    (tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    caplog.clear()
    with caplog.at_level("INFO"):
        _announce_shm_build()
    assert caplog.text == ""  # built: nothing to say


def test_wandb_mode_from_the_environment(tmp_path: Path, prepared: Path) -> None:
    proc = child(train_args(prepared, tmp_path / "run", **{"train.max_steps": 2, "logging.wandb": "auto"}),
                 env={"WANDB_MODE": "offline", "WANDB_API_KEY": "x" * 40, "WANDB_SILENT": "true"})
    assert proc.wait(180) == 0, proc.stderr.read()[-2000:]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "WANDB_MODE=offline was not followed"


def test_a_missing_source_is_reported_before_any_tokenizer_is_trained(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    refused(["train", "--config", REPO / "configs" / "debug.yaml", f"--data.source={tmp_path / 'nothing.jsonl'}",
             f"--data.cache_dir={cache}", f"--logging.run_dir={tmp_path / 'run'}"], capsys,
            f"data source '{tmp_path / 'nothing.jsonl'}' does not exist")
    assert not cache.exists() or not list(cache.glob("tokenizer-*"))


def test_benchmarks_alternate_their_contenders() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from alternate import alternate

    calls: list[str] = []
    result = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, steps=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warmup, then A B, B A, A B
    assert len(result["a"]["times"]) == 3 and result["a"]["fastest"] <= result["a"]["median"]
    assert set(result["load_average"]) == {"before", "after"}


def test_the_run_folder_holds_the_printed_figures_and_the_time(tmp_path: Path, prepared: Path,
                                                                capsys: pytest.CaptureFixture,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """summary.json is the JSON printed last (launchers print around stdout's last line), says how the run stopped
    (null after --train.stop_at used to look like an end), counts the run's time over its sessions; every
    metrics.jsonl line has a wall-clock time; a log without a terminal says how far along the run is."""
    import logging

    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="tlm")
    status, out, err = cli(train_args(prepared, run, **{"train.stop_at": 4}), capsys)
    assert status == 0, err
    printed, saved = json.loads(out.splitlines()[-1]), json.loads((run / "summary.json").read_text())
    assert printed == saved and saved["stopped"] == "stop_at" and len(saved["losses"]) == 4
    assert "step 4/8: loss" in caplog.text and "50.0%" in caplog.text and "elapsed, ETA" in caplog.text
    first = saved["wall_seconds"]
    status, out, err = cli(train_args(prepared, run), capsys)
    assert status == 0, err
    saved = json.loads((run / "summary.json").read_text())
    assert saved["stopped"] is None and saved["complete"] and saved["wall_seconds"] > first > 0
    assert saved["session_seconds"] < saved["wall_seconds"]
    records = read_metrics(run / "metrics.jsonl")
    assert all(isinstance(r["time"], float) for r in records)
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)


def test_a_gpu_recipe_on_the_cpu_says_so_before_anything_is_loaded(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the recipe runs where it is meant to")
    caplog.set_level(logging.INFO, logger="tlm")
    refused(["train", "--config", REPO / "configs" / "tlm-26m.yaml", f"--data.prepared={tmp_path / 'none'}",
             f"--logging.run_dir={tmp_path / 'run'}"], capsys, "none")
    assert "this recipe is for a GPU: 23.6 TFLOP a step" in caplog.text and "configs/cpu-demo.yaml" in caplog.text
    caplog.clear()
    refused(["train", "--config", REPO / "configs" / "debug.yaml", f"--data.prepared={tmp_path / 'none'}",
             f"--logging.run_dir={tmp_path / 'run'}"], capsys, "none")
    assert "for a GPU" not in caplog.text


def test_a_bundled_recipe_is_named_without_its_path(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--config debug (or ablations/cpu, or debug.yaml) is the bundled recipe from any folder; an unknown name is
    refused with the bundled names listed; a file of that name in the working folder wins over the bundled one."""
    monkeypatch.chdir(tmp_path)
    bundled = load_config(str(REPO / "configs" / "debug.yaml"))
    for name in ("debug", "debug.yaml"):
        assert load_config(name) == bundled and load_config(name).name == "debug"
    assert load_config("ablations/cpu").model == load_config(str(REPO / "configs" / "ablations" / "cpu.yaml")).model
    refused(["train", "--config", "no-such-recipe"], capsys, "config file 'no-such-recipe' does not exist",
            "bundled recipes: ", "cpu-demo, debug,")
    (tmp_path / "debug").write_text("train:\n  max_steps: 3\n")
    assert load_config("debug").train.max_steps == 3
