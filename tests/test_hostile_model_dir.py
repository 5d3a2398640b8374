"""Hostile input: model directories (tlm_config.json, model.safetensors) and tokenizer files that lie, read by
`tlm generate` / `tlm eval` / `tlm export`. Each is one line before anything is allocated; exported and saved
files are readable by the rest of a team (the umask, not 0600)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hostile import cli, edit_json, refused, snapshot
from tlm.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, data_tokenizer: Path) -> Path:
    out = tmp_path_factory.mktemp("hostile-models") / "m"
    main(["init", "--out", str(out), "--preset", "debug", "--tokenizer", str(data_tokenizer)])
    return out


def copy_model(model: Path, dst: Path) -> Path:
    shutil.copytree(model, dst)
    return dst


def generate(model: Path, *extra: str) -> list[str]:
    return ["generate", "--checkpoint", model, "--prompt_ids", "[1, 2, 3]", "--max_new_tokens", "4", *extra]


CONFIG_CASES = {
    "a billion layers": (lambda c: c["model"].update(num_hidden_layers=10**9), "describes 4.93e+13 parameters (num_hidden_layers 1,000,000,000"),
    "NaN rms_norm_eps": (lambda c: c["model"].update(rms_norm_eps=float("nan")), "'rms_norm_eps' must be a finite number > 0"),
    "negative rope_theta": (lambda c: c["model"].update(rope_theta=-10000.0), "'rope_theta' must be a finite number > 0"),
    "string format_version": (lambda c: c.update(format_version="1"), "key 'format_version': input should be a valid integer"),
    "newer format_version": (lambda c: c.update(format_version=7), "format_version 7 is newer than this tlm reads"),
    "unknown model key": (lambda c: c["model"].update(num_kv_heads=1), "unknown model config key 'num_kv_heads'"),
    "wrong type": (lambda c: c["model"].update(hidden_size="64"), "'hidden_size' must be int"),
    "YaRN factor of infinity": (lambda c: c["model"].update(
        rope_scaling={"rope_type": "yarn", "factor": float("inf"), "original_max_position_embeddings": 64}),
        "rope_scaling 'factor' must be a number >= 1"),
    "no model object": (lambda c: c.pop("model"), "not a tlm model config"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_a_config_that_lies_is_one_line_before_anything_is_built(tmp_path: Path, model: Path, case: str,
                                                                 capsys: pytest.CaptureFixture) -> None:
    folder = copy_model(model, tmp_path / "m")
    edit, message = CONFIG_CASES[case]
    edit_json(folder / "tlm_config.json", edit)
    before = snapshot(folder)
    start = time.perf_counter()
    refused(generate(folder), capsys, message)
    assert time.perf_counter() - start < 30  # a billion layers were never built
    assert snapshot(folder) == before


def test_nan_weights_are_refused_naming_the_tensor(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture) -> None:
    folder = copy_model(model, tmp_path / "m")
    weights = load_file(str(folder / "model.safetensors"))
    weights["layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(weights, str(folder / "model.safetensors"))
    refused(generate(folder), capsys, "tensor 'layers.1.mlp.down_proj.weight' holds 1 NaN/Inf values")
    refused(["export", "--checkpoint", folder, "--out", tmp_path / "hf"], capsys, "NaN/Inf")
    assert not (tmp_path / "hf" / "config.json").exists()


def test_a_garbled_tokenizer_is_one_line(tmp_path: Path, model: Path, capsys: pytest.CaptureFixture) -> None:
    folder = copy_model(model, tmp_path / "m")
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 12}}')
    refused(["generate", "--checkpoint", folder, "--prompt", "hello"], capsys, "tokenizer.json: cannot load tokenizer")


def test_a_tokenizer_config_of_the_wrong_shape_is_one_line(tmp_path: Path, data_tokenizer: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    tok = tmp_path / "tok"
    shutil.copytree(data_tokenizer, tok)
    edit_json(tok / "tokenizer_config.json", lambda c: c.update(eos_token=7))
    refused(["init", "--out", tmp_path / "m", "--preset", "debug", "--tokenizer", tok], capsys,
            f"{tok / 'tokenizer_config.json'}: key 'eos_token'")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_and_exported_files_honour_the_umask(tmp_path: Path, model: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        main(["init", "--out", str(tmp_path / "m"), "--preset", "debug"])
        main(["export", "--checkpoint", str(model), "--out", str(tmp_path / "hf")])
    finally:
        os.umask(previous)
    files = [p for p in [*(tmp_path / "m").iterdir(), *(tmp_path / "hf").iterdir()] if p.is_file()]
    assert {p.name for p in files} >= {"tlm_config.json", "model.safetensors", "config.json", "tokenizer.json"}
    for path in files:
        assert path.stat().st_mode & 0o777 == mode, path


def test_a_sound_model_still_generates(model: Path, capsys: pytest.CaptureFixture) -> None:
    status, out, err = cli(generate(model), capsys)
    assert status == 0 and len(json.loads(out.strip().splitlines()[-1])["new_token_ids"][0]) == 4, err
    assert torch.isfinite(load_file(str(model / "model.safetensors"))["norm.weight"]).all()
