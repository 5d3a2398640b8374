"""Config files and the command line under hostile input: a key given twice, several --config, an alias bomb,
an oversized or non-UTF-8 file, seeds and epochs out of range, a context too short for seq_len, run folders
that cannot be one, a metrics.jsonl FIFO, too few file descriptors, and prompts that are not what they claim.
Each is one `tlm: error:` line and exit 2 before any file is written."""

from __future__ import annotations

import errno
import os
import resource
import time
from pathlib import Path

import pytest
import yaml

from hostile import DEBUG, call_main, child, cli, refused, snapshot, train_args


def recipe(tmp_path: Path, text: str | bytes, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def with_config(prepared: Path, run_dir: Path, config: Path, **overrides: object) -> list[str]:
    """`tlm train` on the debug recipe composed with `config` (read after it)."""
    return [*train_args(prepared, run_dir, **overrides), "--config", str(config)]


def refused_before_any_file(args: list[str], run_dir: Path, capsys: pytest.CaptureFixture, *needles: str) -> str:
    line = refused(args, capsys, *needles)
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
    return line


# --- the config file ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  max_steps: 2\noptim:\n  lr: 0.01\ntrain:\n  seed: 3\n", "'train'", "(lines 1 and 5)"),
    ("train:\n  seed: 1\n  max_steps: 2\n  seed: 2\n", "'train.seed'", "(lines 2 and 4)"),
    ("data:\n  mix:\n    - {path: a, weight: 1, weight: 2}\n", "'data.mix.0.weight'", "(lines 3 and 3)"),
])
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path: Path, prepared: Path, text: str, key: str,
                                                        lines: str, capsys: pytest.CaptureFixture) -> None:
    config, run_dir = recipe(tmp_path, text), tmp_path / "run"
    refused_before_any_file(with_config(prepared, run_dir, config), run_dir, capsys,
                            f"config file '{config}': key {key} is given twice {lines}", "keep one")


def test_a_section_key_and_the_same_dotted_key_are_refused(tmp_path: Path, prepared: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    config, run_dir = recipe(tmp_path, "train:\n  seed: 1\ntrain.seed: 2\n"), tmp_path / "run"
    refused_before_any_file(with_config(prepared, run_dir, config), run_dir, capsys, "key 'train.seed' is given twice")


def test_several_configs_compose_key_by_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Later files override the keys earlier ones set; keys they do not give keep the earlier value; the flags
    come last; the run is named after the last file."""
    first = recipe(tmp_path, "model:\n  preset: debug\n  num_key_value_heads: 1\ntrain:\n  max_steps: 3\n  seed: 1\n",
                   "first.yaml")
    second = recipe(tmp_path, "model:\n  hidden_size: 128\ntrain:\n  seed: 2\noptim:\n  lr: 0.002\n", "second.yaml")
    status, out, err = cli(["train", "--config", DEBUG, "--config", first, f"--config={second}", "--optim.lr=0.003",
                            "--show_config"], capsys)
    assert status == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["name"] == "second"
    model = resolved["model"]  # resolved: the debug preset with the two files' fields
    assert (model["num_key_value_heads"], model["hidden_size"], model["num_hidden_layers"]) == (1, 128, 2)
    assert resolved["train"]["max_steps"] == 3 and resolved["train"]["seed"] == 2
    assert resolved["train"]["backend"] == "single"  # from debug.yaml, which neither later file names
    assert resolved["data"]["seq_len"] == 64 and resolved["optim"]["lr"] == 0.003
    refused(["train", "--config", DEBUG, "--config", tmp_path / "missing.yaml", "--show_config"], capsys,
            f"config file '{tmp_path / 'missing.yaml'}' does not exist")


def test_a_config_named_like_a_number_is_read_as_a_file_name(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe(tmp_path, "model:\n  preset: debug\n", "1e3")
    status, out, err = cli(["train", "--config", "1e3", "--show_config"], capsys)
    assert status == 0 and yaml.safe_load(out)["name"] == "1e3", err


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path, prepared: Path, capsys: pytest.CaptureFixture) -> None:
    """A ~700-byte "billion laughs": nine levels of nine aliases each (used to spin a minute, then MemoryError)."""
    lines = ["a: &a [" + ", ".join(['"lol"'] * 9) + "]"]
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
    config, run_dir = recipe(tmp_path, "\n".join(lines) + "\n"), tmp_path / "run"
    assert config.stat().st_size < 1000
    start = time.perf_counter()
    refused_before_any_file(with_config(prepared, run_dir, config), run_dir, capsys,
                            f"config file '{config}', line 2: YAML alias '*a' refused", "write the values out")
    assert time.perf_counter() - start < 5


def test_a_config_over_the_size_bound_is_refused_and_the_flag_raises_it(tmp_path: Path, prepared: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    config, run_dir = recipe(tmp_path, "# " + "x" * 2**20 + "\ntrain:\n  max_steps: 3\n"), tmp_path / "run"
    refused_before_any_file(with_config(prepared, run_dir, config), run_dir, capsys,
                            f"config file '{config}' holds {config.stat().st_size:,} bytes, over 1 MiB",
                            "--max_config_mb N")
    status, out, err = cli(["train", "--config", config, "--max_config_mb", "2", "--show_config"], capsys)
    assert status == 0 and yaml.safe_load(out)["train"]["max_steps"] == 3, err
    refused(["train", "--config", config, "--max_config_mb", "-1", "--show_config"], capsys,
            "--max_config_mb must be a positive number of MiB, got -1")


def test_a_deeply_nested_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = recipe(tmp_path, "a: " + "[" * 50000 + "]" * 50000 + "\n")
    refused(["train", "--config", config, "--show_config"], capsys, f"config file '{config}' is nested too deeply")


def test_a_config_that_is_not_utf8_names_the_byte_and_its_offset(tmp_path: Path, prepared: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    config = recipe(tmp_path, b"\xff\xfetrain:\n")
    refused_before_any_file(with_config(prepared, run_dir, config), run_dir, capsys,
                            f"config file '{config}' is not UTF-8 text: byte 0xff at offset 0 (line 1)")
    config = recipe(tmp_path, b"train:\n  max_steps: 3  # caf\xe9\n")
    refused_before_any_file(with_config(prepared, run_dir, config), run_dir, capsys, "byte 0xe9 at offset 28 (line 2)")


def test_a_byte_order_mark_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = recipe(tmp_path, b"\xef\xbb\xbftrain:\n  max_steps: 3\n")
    status, out, err = cli(["train", "--config", DEBUG, "--config", config, "--show_config"], capsys)
    assert status == 0 and yaml.safe_load(out)["train"]["max_steps"] == 3, err


# --- values ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"train.epochs": "1e308", "train.max_steps": "null"},
     "config key 'train.epochs' must be at most 1e+06, got 1e+308"),
    ({"train.seed": -1}, "config key 'train.seed' must be in [0, 2**32), got -1"),
    ({"train.seed": 2**77}, f"config key 'train.seed' must be in [0, 2**32), got {2**77}"),
    ({"train.seed": 2**32}, f"must be in [0, 2**32), got {2**32}"),
    ({"data.seq_len": 4096}, "data.seq_len 4096 exceeds the model's context of 2048 (model.max_position_embeddings); "
                             "raise it with --model.max_position_embeddings=4096"),
])
def test_values_out_of_range_are_refused_before_any_file(tmp_path: Path, prepared: Path, overrides: dict,
                                                         message: str, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    refused_before_any_file(train_args(prepared, run_dir, **overrides), run_dir, capsys, message)


# --- where tlm train writes --------------------------------------------------------------------------------------

def test_run_folders_that_cannot_be_one(tmp_path: Path, prepared: Path, capsys: pytest.CaptureFixture) -> None:
    refused(train_args(prepared, "/dev/null"), capsys,
            "run folder '/dev/null' is not a directory (it is a character device)")
    a_file = recipe(tmp_path, "text\n", "notes.txt")
    refused(train_args(prepared, a_file / "run"), capsys,
            f"run folder '{a_file / 'run'}' cannot be created: '{a_file}' is not a directory (it is a regular file)")
    refused(train_args(prepared, a_file), capsys, f"run folder '{a_file}' is not a directory (it is a regular file)")
    long = tmp_path / ("r" * 300)
    refused(train_args(prepared, long), capsys, f"run folder '{long}': name too long (300 > 255 bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and a_file.read_text() == "text\n"


@pytest.mark.skipif(not Path("/proc/self/mountinfo").is_file(), reason="no /proc")
def test_a_run_folder_under_proc_is_refused(prepared: Path, capsys: pytest.CaptureFixture) -> None:
    refused(train_args(prepared, "/proc/tlm-run"), capsys, "run folder '/proc/tlm-run' is on /proc, a proc file system")
    refused(train_args(prepared, "/proc/self"), capsys, "run folder '/proc/self' is on /proc")


def test_a_metrics_fifo_is_refused_before_training(tmp_path: Path, prepared: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / "metrics.jsonl")
    refused(train_args(prepared, run_dir), capsys,
            f"{run_dir / 'metrics.jsonl'} is not a regular file (it is a FIFO)", "remove it")
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


def test_too_few_open_files_is_one_line_naming_ulimit(tmp_path: Path, prepared: Path) -> None:
    run_dir = tmp_path / "run"
    proc = child(train_args(prepared, run_dir),
                 preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (20, 20)))
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("tlm: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "needs at least 64 open files: this process may open 20 files (ulimit -n)" in lines[0]
    assert "`ulimit -n 4096`" in lines[0] and "the hard limit is 20" in lines[0]
    assert not run_dir.exists()


def test_too_many_open_files_later_is_one_line(tmp_path: Path, prepared: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Where EMFILE surfaces past the check (a first-use prepare with many tokenizing processes)."""
    import tlm.training.run

    def run_out_of_files(*args: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files", "shard.arrow")

    monkeypatch.setattr(tlm.training.run, "run_training", run_out_of_files)
    refused(train_args(prepared, tmp_path / "run"), capsys, "too many open files (opening shard.arrow): this process "
            "may open", "(ulimit -n); raise the limit")


# --- tlm generate and tlm eval -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, data_tokenizer: Path) -> Path:
    """A freshly initialised debug model with the test data's tokenizer (context 2048)."""
    out = tmp_path_factory.mktemp("hostile-config") / "model"
    assert call_main(["init", "--out", out, "--preset", "debug", "--tokenizer", data_tokenizer]) == 0
    return out


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "[]"], "--prompt is an empty list"),
    (["--prompt_ids", "abc"], "--prompt_ids must be a list of token ids, e.g. '[1, 2, 3]', or a list of such lists "
                              "for a batch, got 'abc'"),
    (["--prompt_ids", "[]"], "--prompt_ids is an empty list"),
    (["--prompt_ids", "[[True]]"], "--prompt_ids: prompt 0 holds True, not a token id (a whole number)"),
    (["--prompt_ids", "[[true]]"], "--prompt_ids: prompt 0 holds 'true', not a token id"),
    (["--prompt_ids", "[[1.5]]"], "--prompt_ids: prompt 0 holds 1.5, not a token id"),
    (["--prompt_ids", "[[1], [2, [3]]]"], "--prompt_ids: prompt 1 holds [3], not a token id"),
    (["--prompt_ids", "[1]", "--seed", str(2**77)], f"--seed must be below 2**64, got {2**77}"),
])
def test_generate_refuses_prompts_that_are_not_prompts(model: Path, extra: list[str], message: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    before = snapshot(model)
    refused(["generate", "--checkpoint", model, *extra], capsys, message)
    assert snapshot(model) == before


def test_generate_refuses_a_prompt_of_invalid_utf8(model: Path) -> None:
    proc = child(["generate", "--checkpoint", model, "--prompt", "caf\udcff!"])  # argv bytes b"caf\xff!"
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("tlm: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "--prompt is not valid UTF-8 text (byte 0xff at offset 3)" in lines[0]


def test_tiny_temperature_and_top_p_are_greedy(model: Path, capsys: pytest.CaptureFixture) -> None:
    """1e-45 and 1e-300 used to overflow (inf - inf = NaN) or round to 0 in float32, a traceback; now they pick the
    most likely token, as they tend to."""
    import json

    def new_ids(*extra: str) -> list:
        status, out, err = cli(["generate", "--checkpoint", model, "--prompt_ids", "[1, 2, 3]", "--max_new_tokens",
                                "4", *extra], capsys)
        assert status == 0 and "Traceback" not in err, err[-3000:]
        return json.loads(out.splitlines()[-1])["new_token_ids"]

    greedy = new_ids("--temperature", "0")  # sampling is the default; 0 asks for greedy
    assert new_ids("--temperature", "1e-45") == greedy
    assert new_ids("--temperature", "1", "--top_p", "1e-300") == greedy
    assert new_ids("--temperature", "5e-324", "--top_p", "5e-324") == greedy


def test_eval_refuses_rows_past_the_context(tmp_path: Path, model: Path, prepared: Path, data_tokenizer: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    text = recipe(tmp_path, "It was a dark and stormy night. " * 50, "text.txt")
    refused(["eval", "--checkpoint", model, "--data", text, "--seq_len", "4096"], capsys,
            "--seq_len 4096 exceeds the model's context of 2048 (max_position_embeddings of", "--seq_len 2048 or less")
    short = tmp_path / "short"
    assert call_main(["init", "--out", short, "--preset", "debug", "--tokenizer", data_tokenizer,
                      "--max_position_embeddings=32"]) == 0
    before = snapshot(prepared)
    refused(["eval", "--checkpoint", short, "--data", prepared], capsys,
            f"{prepared} holds rows of seq_len 64, past the model's context of 32")
    assert snapshot(prepared) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short", "text.txt"]
