"""TransformerLM: each ablation switch changes the computation as intended, causality, init, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import combo_id, debug_config, switch_combinations
from tlm.model.transformer import TransformerLM

COMBOS = switch_combinations()


def reference_forward(model: TransformerLM, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's math written out independently: explicit norms, complex-number RoPE, repeated K/V
    heads, an explicit masked softmax, and the MLP formulas; read straight from the weights."""
    c = model.config
    d, h, kv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    batch, seq = input_ids.shape

    def norm(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if c.norm == "none":
            return x
        if c.norm == "layernorm":
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + c.rms_norm_eps)
        else:
            x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)
        return x * weight

    def rope(x: torch.Tensor) -> torch.Tensor:  # x: (batch, heads, seq, d)
        if c.position_embedding == "nope":
            return x
        angles = torch.arange(seq, dtype=torch.float64)[:, None] * model.rotary_emb.inv_freq.double()[None]
        scale = model.rotary_emb.attention_scaling
        z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(scale * torch.ones_like(angles), angles)
        return torch.cat([z.real, z.imag], dim=-1).float()

    def attention(layer, x: torch.Tensor) -> torch.Tensor:
        a = layer.self_attn
        q = (x @ a.q_proj.weight.T).view(batch, seq, h, d).transpose(1, 2)
        k = (x @ a.k_proj.weight.T).view(batch, seq, kv, d).transpose(1, 2)
        v = (x @ a.v_proj.weight.T).view(batch, seq, kv, d).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
        out = scores.softmax(-1) @ v
        return out.transpose(1, 2).reshape(batch, seq, h * d) @ a.o_proj.weight.T

    def mlp(layer, x: torch.Tensor) -> torch.Tensor:
        m = layer.mlp
        if c.mlp == "swiglu":
            hidden = F.silu(x @ m.gate_proj.weight.T) * (x @ m.up_proj.weight.T)
        else:
            hidden = F.silu(x @ m.up_proj.weight.T)
        return hidden @ m.down_proj.weight.T

    def weight(module) -> torch.Tensor | None:
        return getattr(module, "weight", None)

    x = model.embed_tokens.weight[input_ids]
    for layer in model.layers:
        n1, n2 = weight(layer.input_layernorm), weight(layer.post_attention_layernorm)
        if c.norm_position == "pre":
            x = x + attention(layer, norm(x, n1))
            x = x + mlp(layer, norm(x, n2))
        else:
            x = norm(x + attention(layer, x), n1)
            x = norm(x + mlp(layer, x), n2)
    if c.norm_position == "pre":
        x = norm(x, weight(model.norm))
    return x @ model.lm_head.weight.T


def randomise_norm_weights(model: TransformerLM) -> None:
    # Norm weights start at 1; perturb them so that a wrong placement of a norm cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_forward_matches_the_written_out_reference(combo: dict) -> None:
    model = TransformerLM(debug_config(**combo)).eval()
    randomise_norm_weights(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ours, ref = model(ids), reference_forward(model, ids)
    assert (ours - ref).norm() / ref.norm() < 1e-5


def test_reference_covers_yarn() -> None:
    model = TransformerLM(debug_config(rope_scaling={"factor": 4.0, "original_max_position_embeddings": 8})).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert (model(ids) - reference_forward(model, ids)).norm() / reference_forward(model, ids).norm() < 1e-5


@pytest.mark.parametrize(
    "combo",
    COMBOS + [{"rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 8}}],
    ids=lambda c: combo_id(c) if "norm" in c else "yarn",
)
def test_changing_token_t_never_changes_earlier_logits(combo: dict) -> None:
    model = TransformerLM(debug_config(**combo)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        base = model(ids)
        for t in (0, 7, 19):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1) % model.config.vocab_size
            logits = model(changed)
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=0)
            assert not torch.allclose(logits[:, t], base[:, t])


def sublayer_inputs(model: TransformerLM, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(input of layer 0's attention, outputs of every block) captured with hooks."""
    seen: dict[str, torch.Tensor] = {}
    outputs: list[torch.Tensor] = []
    hooks = [model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.setdefault("q_in", a[0]))]
    hooks += [layer.register_forward_hook(lambda m, a, o: outputs.append(o)) for layer in model.layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return seen["q_in"], outputs


def test_norm_switch_sets_what_the_attention_sees() -> None:
    ids = torch.randint(0, 6400, (2, 16))
    for norm in ("rmsnorm", "layernorm", "none"):
        # A negligible eps: with embeddings of std 0.02, eps 1e-5 would be 2.5% of the mean square.
        model = TransformerLM(debug_config(norm=norm, rms_norm_eps=1e-12)).eval()
        q_in, _ = sublayer_inputs(model, ids)
        embeddings = model.embed_tokens.weight[ids]
        if norm == "rmsnorm":
            torch.testing.assert_close(q_in.pow(2).mean(-1), torch.ones(2, 16), rtol=1e-4, atol=1e-4)
            assert q_in.mean(-1).abs().max() > 1e-3  # scaled, not centred
        elif norm == "layernorm":
            torch.testing.assert_close(q_in.mean(-1), torch.zeros(2, 16), rtol=0, atol=1e-5)
            torch.testing.assert_close(q_in.var(-1, unbiased=False), torch.ones(2, 16), rtol=1e-3, atol=1e-3)
        else:
            torch.testing.assert_close(q_in, embeddings, rtol=0, atol=0)


def test_norm_position_post_normalises_after_the_residual_add() -> None:
    ids = torch.randint(0, 6400, (2, 16))
    post = TransformerLM(debug_config(norm_position="post", rms_norm_eps=1e-12)).eval()
    pre = TransformerLM(debug_config(norm_position="pre")).eval()
    post_in, post_out = sublayer_inputs(post, ids)
    pre_in, pre_out = sublayer_inputs(pre, ids)
    # Post-norm: attention reads the raw embedding, every block's output has unit RMS.
    torch.testing.assert_close(post_in, post.embed_tokens.weight[ids], rtol=0, atol=0)
    for out in post_out:
        torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(2, 16), rtol=1e-4, atol=1e-4)
    # Pre-norm: the residual stream stays at the embeddings' scale (std 0.02), never normalised.
    assert pre_out[-1].pow(2).mean().sqrt() < 0.2
    assert isinstance(post.norm, torch.nn.Identity) and not isinstance(pre.norm, torch.nn.Identity)


def test_nope_ignores_the_order_of_earlier_tokens_and_rope_does_not() -> None:
    ids = torch.randint(0, 6400, (1, 12))
    swapped = ids.clone()
    swapped[0, [2, 5]] = ids[0, [5, 2]]
    for pe in ("nope", "rope"):
        # One layer: its attention sees the earlier tokens' embeddings as a set. (With more layers the
        # causal mask itself leaks order into the hidden states, which is how NoPE models learn position.)
        model = TransformerLM(debug_config(position_embedding=pe, num_hidden_layers=1)).eval()
        with torch.no_grad():
            a, b = model(ids)[0, 6:], model(swapped)[0, 6:]
        if pe == "nope":  # causal attention over a set: only *which* tokens came before matters
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert model.rotary_emb is None
        else:
            assert not torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gqa_equals_multi_head_attention_with_repeated_kv_weights() -> None:
    gqa = TransformerLM(debug_config(num_key_value_heads=2)).eval()
    mha = TransformerLM(debug_config(num_key_value_heads=4)).eval()
    d = gqa.config.head_dim
    state = gqa.state_dict()
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # each KV head serves 2 query heads
            state[name] = tensor.view(2, d, -1).repeat_interleave(2, dim=0).reshape(4 * d, -1)
    mha.load_state_dict(state)
    ids = torch.randint(0, 6400, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids), mha(ids), rtol=1e-5, atol=1e-6)
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (2 * d, 64)


def test_mlp_switch_changes_the_formula() -> None:
    silu = TransformerLM(debug_config(mlp="silu"))
    swiglu = TransformerLM(debug_config(mlp="swiglu"))
    assert not hasattr(silu.layers[0].mlp, "gate_proj") and hasattr(swiglu.layers[0].mlp, "gate_proj")
    assert silu.layers[0].mlp.up_proj.weight.shape == (4 * 64, 64)
    x = torch.randn(3, 64)
    m = silu.layers[0].mlp
    torch.testing.assert_close(m(x), F.silu(x @ m.up_proj.weight.T) @ m.down_proj.weight.T)
    m = swiglu.layers[0].mlp
    expected = (F.silu(x @ m.gate_proj.weight.T) * (x @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    torch.testing.assert_close(m(x), expected)


def test_init_scales_and_first_loss() -> None:
    model = TransformerLM(debug_config(num_hidden_layers=4, hidden_size=256, num_attention_heads=4))
    std = model.config.initializer_range
    assert model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.layers[0].self_attn.o_proj.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.05)
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.05)
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, 6400, (4, 64))
    with torch.no_grad():
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    assert loss.item() == pytest.approx(math.log(6400), abs=0.15)  # near-uniform first predictions


def test_untied_embeddings_are_separate() -> None:
    model = TransformerLM(debug_config(tie_word_embeddings=False))
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert model.num_parameters() == TransformerLM(debug_config()).num_parameters() + 6400 * 64


@pytest.mark.parametrize("combo", [{}, {"norm": "none", "norm_position": "post", "mlp": "silu", "position_embedding": "nope"}])
def test_a_few_steps_learn_a_repeated_batch(combo: dict) -> None:
    model = TransformerLM(debug_config(**combo))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 6400, (4, 33))
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_bf16_forward_runs_and_stays_close_to_fp32() -> None:
    model = TransformerLM(debug_config()).eval()
    ids = torch.randint(0, 6400, (2, 32))
    with torch.no_grad():
        fp32 = model(ids)
        bf16 = model.to(torch.bfloat16)(ids)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float() - fp32).norm() / fp32.norm() < 3e-2
