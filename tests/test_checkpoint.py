"""The model directory: round trip, and clear errors for every way a checkpoint can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import debug_config
from tlm.checkpointing.model_dir import CONFIG_NAME, WEIGHTS_NAME, read_model_config, load_model_dir, save_model_dir
from tlm_base.errors import CheckpointError
from tlm.model.transformer import TransformerLM


@pytest.fixture
def saved(tmp_path: Path) -> tuple[TransformerLM, Path]:
    model = TransformerLM(debug_config()).eval()
    return model, save_model_dir(model, tmp_path / "model")


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}, {"rope_scaling": {"factor": 2.0, "original_max_position_embeddings": 64}}])
def test_round_trip_gives_identical_logits(tmp_path: Path, overrides: dict) -> None:
    model = TransformerLM(debug_config(**overrides)).eval()
    save_model_dir(model, tmp_path / "m")
    loaded = load_model_dir(tmp_path / "m")
    ids = torch.randint(0, 6400, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == model.config.tie_word_embeddings


def test_directory_is_self_describing(saved: tuple[TransformerLM, Path]) -> None:
    model, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert meta["format"] == "tlm-model" and meta["format_version"] == 1
    assert meta["num_parameters"] == model.num_parameters()
    assert meta["model"] == model.config.to_dict()
    weights = load_file(str(path / WEIGHTS_NAME))
    assert "lm_head.weight" not in weights  # tied: stored once, as embed_tokens
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]


def test_load_in_bf16(saved: tuple[TransformerLM, Path]) -> None:
    _, path = saved
    model = load_model_dir(path, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.rotary_emb.inv_freq.dtype == torch.float32


def test_shape_mismatch_names_the_tensor(saved: tuple[TransformerLM, Path]) -> None:
    _, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta["model"]["num_key_value_heads"] = 4
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tensor 'layers.0.self_attn.k_proj.weight' has shape \(32, 64\) but the config expects \(64, 64\)"):
        load_model_dir(path)


def test_changing_a_shape_at_load_is_caught(saved: tuple[TransformerLM, Path]) -> None:
    _, path = saved
    with pytest.raises(CheckpointError, match="k_proj.weight"):
        load_model_dir(path, num_key_value_heads=1)


def test_missing_and_unexpected_tensors_are_named(saved: tuple[TransformerLM, Path]) -> None:
    _, path = saved
    weights = load_file(str(path / WEIGHTS_NAME))
    removed = dict(weights)
    del removed["layers.1.mlp.up_proj.weight"]
    save_file(removed, str(path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="tensor 'layers.1.mlp.up_proj.weight' is missing"):
        load_model_dir(path)
    save_file({**weights, "layers.7.extra": torch.zeros(2)}, str(path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="unexpected tensor 'layers.7.extra'"):
        load_model_dir(path)


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    big = TransformerLM(debug_config(hidden_size=128)).eval()
    small = TransformerLM(debug_config()).eval()
    save_model_dir(small, tmp_path / "m")
    save_model_dir(big, tmp_path / "big")
    (tmp_path / "m" / WEIGHTS_NAME).write_bytes((tmp_path / "big" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(CheckpointError, match="tensor 'embed_tokens.weight' has shape .6400, 128. but the config expects .6400, 64."):
        load_model_dir(tmp_path / "m")


def test_unknown_config_key_names_file_and_key(saved: tuple[TransformerLM, Path]) -> None:
    _, path = saved
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta["model"]["num_experts"] = 8
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tlm_config.json: unknown model config key 'num_experts'"):
        read_model_config(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:1000]), "cannot read weights"),
        (lambda p: (p / WEIGHTS_NAME).unlink(), "has tlm_config.json but no model.safetensors"),
        (lambda p: (p / CONFIG_NAME).write_text("{not json"), "not valid JSON"),
        (lambda p: (p / CONFIG_NAME).write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
        (lambda p: (p / CONFIG_NAME).write_text('{"format": "other"}'), "not a tlm model config"),
        (lambda p: (p / CONFIG_NAME).write_text('{"format": "tlm-model", "format_version": 99, "model": {}}'), "newer than this tlm reads"),
        (lambda p: (p / CONFIG_NAME).unlink(), "not a tlm model directory"),
    ],
)
def test_damaged_directories_give_clear_errors(saved: tuple[TransformerLM, Path], damage, message: str) -> None:
    _, path = saved
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_model_dir(path)


def test_wrong_kind_of_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_dir(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_model_dir(tmp_path / "file")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="looks like a Hugging Face model folder"):
        load_model_dir(tmp_path / "hf")


def test_tokenizer_files_travel_with_the_model(tmp_path: Path, tokenizer_dir: Path) -> None:
    model = TransformerLM(debug_config())
    path = save_model_dir(model, tmp_path / "m", tokenizer_dir=tokenizer_dir)
    assert (path / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert (path / "tokenizer_config.json").exists()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        save_model_dir(model, tmp_path / "m2", tokenizer_dir=tmp_path)
