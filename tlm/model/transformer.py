"""TransformerLM: a Llama-style decoder in which every architectural choice is a config switch.

Module and parameter names are those of transformers' `modeling_llama.py` (`embed_tokens`,
`layers.N.self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, `norm`, `lm_head`), so a Hugging Face
export is a rename that adds the `model.` prefix. No distributed code lives here: backends wrap the
model from outside.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tlm.model.config import ModelConfig
from tlm.model.loss import cross_entropy_sum
from tlm.model.rope import RotaryEmbedding, apply_rotary_pos_emb


class KVCacheLike(Protocol):
    """What the model needs of a KV cache (the concrete one lives in tlm.model.generate)."""

    pos: int
    """Number of positions already stored: the position of the next token fed in."""

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (batch, kv_heads, seq, head_dim) key/value at `pos` and return everything stored so far."""
        ...

    def advance(self, num_tokens: int) -> None:
        """Move `pos` forward once every layer has stored its keys and values."""
        ...


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 as LlamaRMSNorm does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def build_norm(config: ModelConfig) -> nn.Module:
    """The normalisation layer the `norm` switch asks for."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.rms_norm_eps)
    if config.norm == "layernorm":
        # No bias, like every other layer of the model: the ablation compares centring + scaling with
        # RMSNorm's scaling alone, not an extra parameter vector.
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps, bias=False)
    return nn.Identity()


class Attention(nn.Module):
    """Causal self-attention with grouped key/value heads, through scaled_dot_product_attention."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCacheLike | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if kv_cache is not None:
            key, value = kv_cache.update(self.layer_idx, key, value)
        # enable_gqa lets SDPA share each K/V head across its group of query heads without
        # materialising num_heads copies (repeat_kv), which is what keeps GQA's memory saving.
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            is_causal=is_causal,
            enable_gqa=self.num_key_value_heads != self.num_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); or the plain two-matrix SiLU MLP: down(silu(up(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.silu(self.up_proj(x)))


class DecoderLayer(nn.Module):
    """One block. `input_layernorm` belongs to the attention sublayer, `post_attention_layernorm` to the
    MLP sublayer (Llama's names); `norm_position` says whether each normalises the sublayer's input
    (pre-norm) or the sum after the residual add (post-norm)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = build_norm(config)
        self.post_attention_layernorm = build_norm(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCacheLike | None = None,
    ) -> torch.Tensor:
        attn_args = (position_embeddings, attention_mask, is_causal, kv_cache)
        if self.pre_norm:
            hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), *attn_args)
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = self.input_layernorm(hidden_states + self.self_attn(hidden_states, *attn_args))
        return self.post_attention_layernorm(hidden_states + self.mlp(hidden_states))


class TransformerLM(nn.Module):
    """Decoder-only language model: embeddings, `num_hidden_layers` blocks, final norm, lm_head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        # Post-norm blocks already end in a normalisation, so a final one would be a second, redundant
        # norm of the same vector; pre-norm needs it because the residual stream is never normalised.
        self.norm = build_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.rotary_emb = RotaryEmbedding(config) if config.position_embedding == "rope" else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise all weights.

        Pre-norm (Llama): every matrix is N(0, initializer_range = 0.02), as GPT-2 and Llama do: small enough
        that the first logits are nearly uniform (loss ~ ln(vocab)) and attention starts close to averaging.
        The two projections that write into the residual stream (o_proj, down_proj) get
        std / sqrt(2 * num_hidden_layers) (GPT-2's scaled init): each block adds two such terms, so this keeps
        the residual stream's variance at the start independent of depth.

        Post-norm: the residual stream is renormalised to unit scale after every sublayer, so a sublayer only
        matters if its output is of that scale too: the projections get LeCun's N(0, 1 / fan_in), the scale of
        the original Transformer's (and torch.nn.TransformerEncoderLayer's) init, and no depth scaling. With
        Llama's 0.02 instead, each block starts as the identity plus ~1e-3, and a post-norm model with tied
        embeddings stayed on the unigram plateau at every learning rate where torch's own post-LN layers train
        (docs/ablations/cpu/postln.md). The embedding keeps std initializer_range (logits start near uniform).
        Norm weights start at 1 (identity scaling).
        """
        std = self.config.initializer_range
        post = self.config.norm_position == "post"
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if post and module is not self.lm_head:
                    nn.init.normal_(module.weight, mean=0.0, std=module.in_features ** -0.5)
                else:
                    scaled = name.endswith(("o_proj", "down_proj"))
                    nn.init.normal_(module.weight, mean=0.0, std=residual_std if scaled else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)

    # Activation checkpointing: "none", "selective" (every second layer) or "full" (every layer), set by the trainer.
    activation_checkpointing = "none"

    def _recomputes(self, index: int) -> bool:
        # Selective takes the even layers: the last layer of an even depth keeps its activations, so the first
        # recomputation in backward happens after that layer's memory is freed and never raises the peak.
        mode = self.activation_checkpointing
        return mode == "full" or (mode == "selective" and index % 2 == 0)

    def num_parameters(self) -> int:
        """Trainable parameters, counting tied embeddings once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        loss_chunk: int = 0,
    ) -> torch.Tensor:
        """Logits of shape (batch, seq, vocab) (only the last `logits_to_keep` positions when > 0); or, given
        `labels`, the fp32 sum of the cross-entropy of every counted target token (see tlm.model.loss; with
        `loss_chunk` > 0 the logits are never materialised for the whole batch).

        attention_mask: optional boolean (batch or 1, 1, seq, keys), True where a query may attend.
        Without one, attention is causal; with a KV cache the causal mask is offset by `kv_cache.pos`.
        """
        batch, seq = input_ids.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device).unsqueeze(0)
        is_causal = False
        if attention_mask is None:
            if past == 0:
                is_causal = seq > 1
            elif seq > 1:  # a chunk after cached tokens: query i sees keys 0 .. past + i
                keys = torch.arange(past + seq, device=input_ids.device)
                queries = torch.arange(past, past + seq, device=input_ids.device)
                attention_mask = (keys[None, :] <= queries[:, None])[None, None]

        hidden_states = self.embed_tokens(input_ids)
        position_embeddings = None
        if self.rotary_emb is not None:
            position_embeddings = self.rotary_emb(position_ids, hidden_states.dtype)
        for i, layer in enumerate(self.layers):
            if self.training and kv_cache is None and self._recomputes(i):
                hidden_states = checkpoint(layer, hidden_states, position_embeddings, attention_mask, is_causal, None,
                                           use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, position_embeddings, attention_mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq)
        hidden_states = self.norm(hidden_states)
        if labels is not None:
            return cross_entropy_sum(self.lm_head, hidden_states, labels, loss_mask, loss_chunk)
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        return self.lm_head(hidden_states)
