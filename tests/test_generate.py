"""KV cache, sampling and batched generation."""

from __future__ import annotations

import pytest
import torch

from helpers import combo_id, debug_config, switch_combinations
from tlm.model.config import get_preset
from tlm.model.generate import KVCache, generate, kv_cache_bytes, sample_next_token
from tlm.model.transformer import TransformerLM

YARN = {"factor": 4.0, "original_max_position_embeddings": 16}


def varied_model(**overrides) -> TransformerLM:
    """Random weights large enough, and untied, so that greedy decoding does not just repeat a token."""
    return TransformerLM(debug_config(tie_word_embeddings=False, initializer_range=0.3, **overrides)).eval()


@pytest.mark.parametrize(
    "combo", switch_combinations() + [{"rope_scaling": YARN}], ids=lambda c: combo_id(c) if "norm" in c else "yarn"
)
def test_cached_decoding_equals_one_full_forward(combo: dict) -> None:
    model = TransformerLM(debug_config(**combo)).eval()
    ids = torch.randint(0, 6400, (2, 48))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch_size=2, max_length=48)
        # A prompt chunk, single tokens, another chunk (offset causal mask), then single tokens again.
        pieces = [(0, 10), (10, 11), (11, 12), (12, 30)] + [(t, t + 1) for t in range(30, 48)]
        steps = [model(ids[:, a:b], kv_cache=cache) for a, b in pieces]
    incremental = torch.cat(steps, dim=1)
    assert cache.pos == 48
    assert (incremental - full).norm() / full.norm() < 1e-5


def test_cache_stores_kv_heads_never_expanded() -> None:
    config = get_preset("tlm-26m")
    cache = KVCache(config, batch_size=3, max_length=100, dtype=torch.bfloat16)
    assert cache.key.shape == (8, 3, 2, 100, 64)
    assert cache.nbytes == kv_cache_bytes(config, 3, 100, torch.bfloat16)
    model = TransformerLM(debug_config(num_key_value_heads=1)).eval()
    cache = KVCache(model.config, 1, 8)
    with torch.no_grad():
        model(torch.randint(0, 6400, (1, 5)), kv_cache=cache)
    assert cache.key.shape[2] == 1 and cache.pos == 5
    assert cache.key[:, :, :, :5].abs().sum() > 0 and cache.key[:, :, :, 5:].abs().sum() == 0
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        with torch.no_grad():
            model(torch.randint(0, 6400, (1, 4)), kv_cache=cache)


def test_kv_cache_bytes() -> None:
    one = kv_cache_bytes(get_preset("tlm-26m", num_key_value_heads=1), 1, 4096)
    eight = kv_cache_bytes(get_preset("tlm-26m", num_key_value_heads=8), 1, 4096)
    assert eight == 8 * one
    # 2 (k, v) x 8 layers x 2 heads x 512 positions x 64 dims x 2 bytes
    assert kv_cache_bytes(get_preset("tlm-26m"), 1, 512) == 2 * 8 * 2 * 512 * 64 * 2 == 2_097_152
    assert kv_cache_bytes(get_preset("tlm-26m"), 4, 512, torch.float32) == 4 * 2 * 2_097_152


def test_padded_batch_gives_what_each_prompt_gives_alone() -> None:
    model = varied_model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    batched = generate(model, prompts, max_new_tokens=12)
    alone = [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    assert len(set(alone[0])) > 3  # the model really produces varied tokens


def test_generation_stops_on_eos_per_row() -> None:
    model = varied_model()
    prompts = [[5, 6, 7], [8, 9, 10]]
    free = generate(model, prompts, max_new_tokens=10)
    eos = free[0][3]  # the 4th token of the first row becomes the stop token
    stopped = generate(model, prompts, max_new_tokens=10, eos_token_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    if eos not in free[1]:
        assert stopped[1] == free[1]  # the other row goes on to max_new_tokens
    everything = generate(model, [[5, 6, 7]], max_new_tokens=10, eos_token_id=free[0][0])
    assert everything == [[free[0][0]]]


def test_greedy_sampling_is_argmax_and_topk1_is_greedy() -> None:
    logits = torch.randn(4, 100)
    assert torch.equal(sample_next_token(logits, temperature=0.0), logits.argmax(-1))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next_token(logits, temperature=1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, temperature=1.0, top_p=1e-6, generator=g), logits.argmax(-1))


def test_top_k_and_top_p_restrict_the_support() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50).repeat(2000, 1)
    picks = sample_next_token(logits, temperature=1.0, top_k=5, generator=g)
    assert set(picks.tolist()) == set(logits[0].topk(5).indices.tolist())
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4000, 1)
    picks = sample_next_token(probs, temperature=1.0, top_p=0.7, generator=g)
    assert set(picks.tolist()) == {0, 1}  # 0.5 < 0.7, so token 1 is needed; 0.8 >= 0.7 stops there
    picks = sample_next_token(probs, temperature=1.0, top_p=0.81, generator=g)
    assert set(picks.tolist()) == {0, 1, 2}
    share = (sample_next_token(probs, temperature=1.0, generator=g) == 0).float().mean()
    assert 0.45 < share < 0.55


def test_temperature_flattens_the_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.9, 0.1]]).log().repeat(4000, 1)
    cold = (sample_next_token(probs, temperature=0.5, generator=g) == 1).float().mean()
    hot = (sample_next_token(probs, temperature=3.0, generator=g) == 1).float().mean()
    assert cold < 0.05 and hot > 0.3


def test_sampling_is_reproducible_with_a_seed() -> None:
    model = varied_model()
    runs = [
        generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    other = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(8))
    assert other != runs[0]


def test_yarn_changes_long_range_logits_only_through_rope() -> None:
    plain = varied_model()
    yarn = varied_model()
    yarn.load_state_dict(plain.state_dict())
    yarn.config = yarn.config.replace(rope_scaling=YARN)
    from tlm.model.rope import RotaryEmbedding

    yarn.rotary_emb = RotaryEmbedding(yarn.config)
    ids = torch.randint(0, 6400, (1, 200))
    with torch.no_grad():
        assert not torch.allclose(plain(ids)[:, -1], yarn(ids)[:, -1], atol=1e-3)
    assert len(generate(yarn, [ids[0].tolist()], max_new_tokens=5)[0]) == 5


def test_bad_arguments() -> None:
    model = varied_model()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]])
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(torch.randn(1, 5), temperature=-1.0)
    assert generate(model, [[1]], max_new_tokens=0) == [[]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_cached_decoding_and_padded_generation(dtype: torch.dtype) -> None:
    model = TransformerLM(get_preset("tlm-26m")).eval().to("cuda", dtype)
    ids = torch.randint(0, 6400, (2, 64), device="cuda")
    with torch.no_grad():
        full = model(ids).float()
        cache = KVCache(model.config, 2, 64, device="cuda", dtype=dtype)
        steps = [model(ids[:, :40], kv_cache=cache)] + [model(ids[:, t : t + 1], kv_cache=cache) for t in range(40, 64)]
    incremental = torch.cat(steps, dim=1).float()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert (incremental - full).norm() / full.norm() < tolerance
    out = generate(model, [[1, 2, 3, 4, 5], [6, 7]], max_new_tokens=8)
    assert [len(o) for o in out] == [8, 8]
