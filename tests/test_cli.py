"""The real `tlm` command, run as a user runs it: help, init -> generate -> export, and its errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlm.cli import main


def tlm_command() -> list[str]:
    script = Path(sys.executable).parent / "tlm"
    if script.exists():
        return [str(script)]
    found = shutil.which("tlm")
    return [found] if found else [sys.executable, "-m", "tlm"]


def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PAGER": "cat"}
    result = subprocess.run(tlm_command() + list(args), capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == expect, f"tlm {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    if expect != 0:
        assert "Traceback" not in result.stderr, result.stderr
    return result


def last_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_help_lists_every_command() -> None:
    text = run("--help")
    out = text.stdout + text.stderr
    for command in ("init", "generate", "export", "presets", "tokenizer", "prepare", "train", "eval"):
        assert command in out
    for command, flag in (("init", "--preset"), ("generate", "--max_new_tokens"), ("export", "--dtype"),
                          ("tokenizer", "--vocab_size"), ("prepare", "--seq_len"), ("train", "--config"),
                          ("eval", "--max_batches")):
        sub = run(command, "--help")
        assert flag in sub.stdout + sub.stderr


def test_presets_prints_counts(capsys: pytest.CaptureFixture) -> None:
    table = run_here(["presets"], capsys)
    assert table["tlm-26m"]["num_parameters"] == 25_829_888


def test_init_generate_export_end_to_end(tmp_path: Path, tokenizer_dir: Path) -> None:
    model_dir = tmp_path / "model"
    init = last_json(run("init", "--out", str(model_dir), "--preset", "debug", "--tokenizer", str(tokenizer_dir),
                         "--tie_word_embeddings=False", "--initializer_range=0.3"))
    assert init["num_parameters"] == 508_224 + 6400 * 64
    assert init["config"]["eos_token_id"] == 0 and init["config"]["bos_token_id"] == 1

    result = run("generate", "--checkpoint", str(model_dir), "--prompt", "The king walked", "--max_new_tokens", "12",
                 "--temperature", "0")  # greedy: compared with transformers' greedy generate below
    figures = last_json(result)
    assert figures["new_tokens"] == len(figures["new_token_ids"][0]) <= 12
    assert figures["completions"][0] in result.stdout  # the text is printed above the JSON line

    batch = last_json(run("generate", "--checkpoint", str(model_dir), "--prompt", '["The queen", "A ship on the sea"]',
                          "--max_new_tokens", "6", "--temperature", "0.8", "--top_k", "20", "--top_p", "0.9", "--seed", "3"))
    assert len(batch["completions"]) == 2

    long = last_json(run("generate", "--checkpoint", str(model_dir), "--prompt", "The king", "--max_new_tokens", "4",
                         "--rope_scaling", "yarn:4:64"))
    assert long["rope_scaling"]["factor"] == 4.0

    exported = last_json(run("export", "--checkpoint", str(model_dir), "--out", str(tmp_path / "hf")))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(exported["files"])
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = tok("The king walked", return_tensors="pt")
    out = hf.generate(**prompt, do_sample=False, max_new_tokens=12, pad_token_id=0)
    assert out[0, prompt["input_ids"].shape[1]:].tolist() == figures["new_token_ids"][0]


def run_here(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    """Run the CLI in this process (no interpreter start-up) and parse its last stdout line."""
    main(args)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_init_with_overrides_and_kv_heads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    one = run_here(["init", "--out", str(tmp_path / "a"), "--num-key-value-heads=1", "--mlp=silu"], capsys)
    assert one["config"]["num_key_value_heads"] == 1 and one["config"]["intermediate_size"] == 2048
    yarn = run_here(["init", "--out", str(tmp_path / "b"), "--preset", "debug", "--rope_scaling", "yarn:4:512"], capsys)
    assert yarn["config"]["rope_scaling"]["original_max_position_embeddings"] == 512


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    main(["init", "--out", str(root / "m"), "--preset", "debug"])
    main(["init", "--out", str(root / "post"), "--preset", "debug", "--norm_position=post"])
    return root


def test_an_error_through_the_installed_command(models: Path) -> None:
    result = run("generate", "--checkpoint", str(models / "missing"), "--prompt", "x", expect=2)
    assert result.stderr.strip().splitlines()[-1] == f"tlm: error: checkpoint '{models / 'missing'}' does not exist"


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--checkpoint", "{tmp}/m", "--prompt", "x"], "has no tokenizer"),
        (["generate", "--checkpoint", "{tmp}/m"], "give --prompt"),
        (["generate", "--checkpoint", "{tmp}/m", "--prompt_ids", "[1, 99999]"], "token id 99999 outside the vocabulary"),
        (["generate", "--checkpoint", "{tmp}/m", "--prompt_ids", "[1]", "--rope_scaling", "yarn:4"], "yarn:FACTOR:ORIGINAL_CONTEXT"),
        (["generate", "--checkpoint", "{tmp}/m", "--prompt_ids", "[1]", "--dtype", "int4"], "--dtype must be auto or one of"),
        (["generate", "--checkpoint", "{tmp}/m", "--tokenizer", "{tmp}/post", "--prompt", "x"], "has no tokenizer.json"),
        (["init", "--out", "{tmp}/m", "--preset", "debug"], "already holds a model"),
        (["init", "--out", "{tmp}/n", "--preset", "debug", "--num_kv_heads=1"], "unknown model config key 'num_kv_heads'"),
        (["init", "--out", "{tmp}/n", "--preset", "nano"], "unknown preset 'nano'"),
        (["init", "--out", "{tmp}/n", "--preset", "debug", "--num_key_value_heads=3"], "must divide num_attention_heads"),
        (["export", "--checkpoint", "{tmp}/post", "--out", "{tmp}/hf"], "norm_position='post'"),
        (["export", "--checkpoint", "{tmp}/hf-missing", "--out", "{tmp}/hf"], "does not exist"),
    ],
)
def test_errors_are_one_clear_line(models: Path, args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{tmp}", str(models)) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tlm: error: ") and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_asking_for_cuda_without_one(models: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(models / "m"), "--prompt_ids", "[1]", "--device", "cuda"])
    assert "no CUDA device is available" in capsys.readouterr().err


def test_generate_from_token_ids_without_tokenizer(models: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["generate", "--checkpoint", str(models / "m"), "--prompt_ids", "[[1, 2, 3], [4]]", "--max_new_tokens", "5"]
    figures = run_here(args, capsys)
    assert figures["completions"] is None and [len(t) for t in figures["new_token_ids"]] == [5, 5]


def test_generate_samples_by_default_and_separates_the_texts_of_a_batch(models: Path, tokenizer_dir: Path,
                                                                         tmp_path: Path) -> None:
    """Greedy by default used to loop on a small model; several prompts printed without a separator."""
    model_dir = tmp_path / "model"
    run("init", "--out", str(model_dir), "--preset", "debug", "--tokenizer", str(tokenizer_dir), "--initializer_range=0.3")
    result = run("generate", "--checkpoint", str(model_dir), "--prompt", '["The queen", "A ship"]', "--max_new_tokens", "6")
    figures = last_json(result)
    assert (figures["temperature"], figures["top_k"]) == (0.8, 50)
    assert "----- 1/2 -----" in result.stdout and "----- 2/2 -----" in result.stdout
