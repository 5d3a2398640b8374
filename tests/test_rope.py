"""RoPE and YaRN against transformers' own functions, and the properties RoPE must have."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import debug_config
from tlm.model.config import get_preset
from tlm.checkpointing.export import hf_config
from tlm.model.transformer import TransformerLM
from tlm.model.rope import RotaryEmbedding, apply_rotary_pos_emb, compute_inv_freq

YARN_CASES = [
    {"factor": 4.0, "original_max_position_embeddings": 512},
    {"factor": 16.0, "original_max_position_embeddings": 512, "beta_fast": 16, "beta_slow": 2},
    {"factor": 2.0, "original_max_position_embeddings": 128, "attention_factor": 1.5},
    {"factor": 8.0, "original_max_position_embeddings": 256, "truncate": False},
]


def hf_rope(config):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaConfig.from_dict(hf_config(config))
    if config.rope_scaling is None:
        return LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    return ROPE_INIT_FUNCTIONS["yarn"](hf)


def test_default_frequencies_match_transformers() -> None:
    config = get_preset("tlm-26m")
    ours, scale = compute_inv_freq(config)
    theirs, their_scale = hf_rope(config)
    assert ours.dtype == torch.float32 and ours.shape == (32,)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert scale == their_scale == 1.0


@pytest.mark.parametrize("rope_scaling", YARN_CASES)
def test_yarn_frequencies_and_attention_factor_match_transformers(rope_scaling: dict) -> None:
    config = get_preset("tlm-26m", rope_scaling=rope_scaling)
    ours, scale = compute_inv_freq(config)
    theirs, their_scale = hf_rope(config)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert scale == pytest.approx(their_scale, rel=1e-12)
    plain, _ = compute_inv_freq(get_preset("tlm-26m"))
    # High frequencies are kept, the lowest are divided by the factor: YaRN really rescales.
    assert ours[0] == plain[0]
    torch.testing.assert_close(ours[-1], plain[-1] / rope_scaling["factor"])


def test_default_attention_factor_is_0_1_ln_factor_plus_1() -> None:
    _, scale = compute_inv_freq(get_preset("tlm-26m", rope_scaling=YARN_CASES[0]))
    assert scale == pytest.approx(0.1 * math.log(4.0) + 1.0)


def test_half_split_layout_rotates_pairs_i_and_i_plus_half() -> None:
    config = debug_config()
    rope = RotaryEmbedding(config)
    d = config.head_dim
    q = torch.randn(1, 1, 1, d)
    position = 37
    cos, sin = rope(torch.tensor([[position]]), torch.float32)
    rotated, _ = apply_rotary_pos_emb(q, q, cos, sin)
    # Reference: treat (x_i, x_{i+d/2}) as the complex number x_i + i x_{i+d/2}, multiply by e^{i p w_i}.
    z = torch.complex(q[..., : d // 2], q[..., d // 2 :]) * torch.polar(
        torch.ones(d // 2), position * rope.inv_freq.double().float()
    )
    torch.testing.assert_close(rotated, torch.cat([z.real, z.imag], dim=-1), rtol=1e-5, atol=1e-6)


def test_scores_depend_only_on_relative_position() -> None:
    config = debug_config()
    rope = RotaryEmbedding(config)
    q, k = torch.randn(1, 1, 1, config.head_dim), torch.randn(1, 1, 1, config.head_dim)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope(torch.tensor([[pq]]), torch.float32)
        ck, sk = rope(torch.tensor([[pk]]), torch.float32)
        rq, _ = apply_rotary_pos_emb(q, q, cq, sq)
        _, rk = apply_rotary_pos_emb(k, k, ck, sk)
        return (rq * rk).sum()

    torch.testing.assert_close(score(10, 3), score(110, 103), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(score(10, 3), score(10, 5), rtol=1e-3)


def test_casting_the_model_keeps_rope_frequencies_in_fp32() -> None:
    model = TransformerLM(get_preset("debug", rope_scaling=YARN_CASES[0]))
    before = model.rotary_emb.inv_freq.clone()
    model = model.to(torch.bfloat16)
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.rotary_emb.inv_freq, before, rtol=0, atol=0)
    cos, _ = model.rotary_emb(torch.arange(8)[None], torch.bfloat16)
    assert cos.dtype == torch.bfloat16


def test_meta_init_then_to_empty_rebuilds_the_frequencies() -> None:
    config = get_preset("debug", rope_scaling=YARN_CASES[0])
    with torch.device("meta"):
        model = TransformerLM(config)
    model = model.to_empty(device="cpu")
    torch.testing.assert_close(model.rotary_emb.inv_freq, compute_inv_freq(config)[0], rtol=0, atol=0)
