"""ModelConfig: presets, parameter counts, derived fields, and errors that name the key."""

from __future__ import annotations

import pytest
import torch

from tlm.model.config import ModelConfig, get_preset, parse_rope_scaling
from tlm_base.errors import ConfigError
from tlm.model.transformer import TransformerLM

TLM_26M_PARAMETERS = 25_829_888


def count(config: ModelConfig) -> int:
    with torch.device("meta"):
        return TransformerLM(config).num_parameters()


def test_tlm_26m_has_the_original_parameter_count() -> None:
    config = get_preset("tlm-26m")
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (6400, 8, 512)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 2, 64)
    assert config.intermediate_size == 1408 and config.rms_norm_eps == 1e-5 and config.rope_theta == 1e6
    assert config.tie_word_embeddings
    assert count(config) == TLM_26M_PARAMETERS


@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
def test_kv_head_counts_follow_and_match_transformers(kv_heads: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = get_preset("tlm-26m", num_key_value_heads=kv_heads)
    # Each KV head adds a 512 x 64 slice to k_proj and to v_proj in each of the 8 layers.
    expected = TLM_26M_PARAMETERS + 8 * 2 * 512 * 64 * (kv_heads - 2)
    assert count(config) == expected
    hf = LlamaConfig(
        vocab_size=6400, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=kv_heads, tie_word_embeddings=True,
    )
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(hf)
    assert sum(p.numel() for p in hf_model.parameters()) == expected


def test_intermediate_size_is_derived_from_the_mlp_switch() -> None:
    assert get_preset("tlm-26m").intermediate_size == 1408
    assert get_preset("tlm-26m", mlp="silu").intermediate_size == 4 * 512
    assert get_preset("debug").intermediate_size == 192
    assert get_preset("tlm-26m", mlp="silu", intermediate_size=1000).intermediate_size == 1000
    # SiLU at 4x has 2 matrices of 512x2048, SwiGLU 3 of 512x1408: roughly the same size.
    silu, swiglu = count(get_preset("tlm-26m", mlp="silu")), count(get_preset("tlm-26m"))
    assert abs(silu - swiglu) / swiglu < 0.05


def test_debug_preset_is_tiny() -> None:
    assert count(get_preset("debug")) < 1_000_000


def test_dict_roundtrip_rebuilds_the_same_config() -> None:
    config = get_preset("debug", rope_scaling={"factor": 4, "original_max_position_embeddings": 64}, mlp="silu")
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config
    assert again.rope_scaling["rope_type"] == "yarn"


def test_unknown_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown model config key 'rope_thta'.*did you mean 'rope_theta'"):
        get_preset("tlm-26m", rope_thta=1e4)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads .3. must divide num_attention_heads .8."),
        ({"norm": "batchnorm"}, "'norm' must be one of"),
        ({"norm_position": "middle"}, "'norm_position' must be one of"),
        ({"position_embedding": "alibi"}, "'position_embedding' must be one of"),
        ({"mlp": "gelu"}, "'mlp' must be one of"),
        ({"hidden_size": "512"}, "'hidden_size' must be int"),
        ({"num_hidden_layers": True}, "'num_hidden_layers' must be int"),
        ({"hidden_size": 500}, "not divisible by num_attention_heads"),
        ({"eos_token_id": 6400}, "'eos_token_id' = 6400 is outside the vocabulary"),
        ({"position_embedding": "nope", "rope_scaling": {"factor": 2, "original_max_position_embeddings": 512}}, "YaRN scales RoPE only"),
        ({"rope_scaling": {"factor": 2}}, "needs 'original_max_position_embeddings'"),
        ({"rope_scaling": {"factor": 2, "original_max_position_embeddings": 512, "beta": 3}}, "unknown rope_scaling key 'beta'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2}}, "'linear' is not supported"),
        ({"rope_scaling": {"factor": 0.5, "original_max_position_embeddings": 512}}, "'factor' must be a number >= 1"),
    ],
)
def test_bad_values_are_refused_by_name(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_preset("tlm-26m", **overrides)


def test_parse_rope_scaling_forms() -> None:
    expected = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    assert parse_rope_scaling("yarn:4:512") == expected
    assert parse_rope_scaling('{"factor": 4.0, "original_max_position_embeddings": 512}') == expected
    assert parse_rope_scaling({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}) == expected
    assert parse_rope_scaling("none") is None and parse_rope_scaling(None) is None
    with pytest.raises(ConfigError, match="yarn:FACTOR:ORIGINAL_CONTEXT"):
        parse_rope_scaling("yarn:4")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_rope_scaling("{factor: 4}")


def test_replace_revalidates() -> None:
    config = get_preset("debug")
    assert config.replace(num_key_value_heads=1).num_key_value_heads == 1
    with pytest.raises(ConfigError, match="unknown model config key 'kv_heads'"):
        config.replace(kv_heads=1)


def test_true_and_false_from_a_command_line_are_bools() -> None:
    from pathlib import Path

    from tlm.training.config import load_config

    recipe = Path(__file__).resolve().parent.parent / "configs" / "debug.yaml"
    config = load_config(recipe, {"model.tie_word_embeddings": "false", "train.compile": "False", "eval.at_start": "TRUE"})
    assert config.model.tie_word_embeddings is False and config.train.compile is False
    assert config.eval.at_start is True
    with pytest.raises(ConfigError, match="must be bool"):
        load_config(recipe, {"train.compile": "maybe"})
