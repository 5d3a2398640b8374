"""Autoregressive generation: a preallocated KV cache, sampling, and batched `generate()`.

The cache is owned here, not by the model (the model only calls `update` / `advance`). It stores keys
and values at `num_key_value_heads`, never expanded to the query heads, so a GQA model's cache is
`num_attention_heads / num_key_value_heads` times smaller than a multi-head one.
"""

from __future__ import annotations

import torch

from tlm.model.config import ModelConfig
from tlm.model.transformer import TransformerLM


def kv_cache_bytes(config: ModelConfig, batch_size: int, context_length: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a KV cache for `batch_size` sequences of `context_length` tokens:
    2 (key and value) x layers x batch x kv_heads x context x head_dim x bytes per element."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (
        2
        * config.num_hidden_layers
        * batch_size
        * config.num_key_value_heads
        * context_length
        * config.head_dim
        * itemsize
    )


class KVCache:
    """Static cache of shape (layers, batch, kv_heads, max_length, head_dim) for keys and for values.

    `pos` is the explicit position counter: how many positions are filled, i.e. where the next token's
    key and value go. The (kv_heads, length, head_dim) layout lets a slice feed SDPA without a copy.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_length: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.key = torch.zeros(shape, device=device, dtype=dtype)
        self.value = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.pos = 0

    @property
    def nbytes(self) -> int:
        return self.key.nbytes + self.value.nbytes

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values at `pos` and return the filled part of the layer's cache."""
        end = self.pos + key.shape[2]
        if end > self.max_length:
            raise RuntimeError(f"KV cache overflow: {end} positions needed, {self.max_length} allocated")
        self.key[layer_idx, :, :, self.pos : end] = key
        self.value[layer_idx, :, :, self.pos : end] = value
        return self.key[layer_idx, :, :, :end], self.value[layer_idx, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.pos += num_tokens

    def reset(self) -> None:
        self.pos = 0


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of `logits` (batch, vocab).

    temperature 0 is greedy (argmax). Otherwise logits are divided by the temperature, cut to the
    `top_k` most likely tokens (0 = no cut) and to the smallest set whose probability reaches `top_p`
    (1.0 = no cut; the most likely token always stays), then sampled.

    Any temperature > 0 and top_p in (0, 1] work, however small: the work is done in float64 on logits less
    their row's largest, so dividing by a tiny temperature gives 0 for the largest and -inf for the rest (no
    inf - inf = NaN), and a tiny top_p is not rounded to 0 as a float32 would be (which dropped every token).
    Both then tend to greedy, as they should.
    """
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.double()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: TransformerLM,
    prompts: list[list[int]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    Prompts of different lengths are left-padded into one batch: every row shares the cache slots, a
    row's position ids count from its first real token, and a mask hides its padding slots. A row stops
    after emitting `eos_token_id` (kept in its output, as transformers does); the loop stops when all
    rows have. Returns the new tokens of each prompt.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    config = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)

    batch = len(prompts)
    prompt_len = max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    pad_lens = torch.tensor([prompt_len - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[pad] * (prompt_len - len(p)) + list(p) for p in prompts], device=device)
    cache = KVCache(config, batch, total, device=device, dtype=dtype)

    # Slot s of row b holds a real token when s >= pad_lens[b]; its position id is s - pad_lens[b].
    slots = torch.arange(total, device=device)
    valid = slots[None, :] >= pad_lens[:, None]  # (batch, total)
    positions = (slots[None, :] - pad_lens[:, None]).clamp(min=0)
    padded = bool((pad_lens > 0).any())

    def mask_for(start: int, length: int) -> torch.Tensor | None:
        if not padded:
            return None  # the model's own causal (offset) masking is exact
        queries = slots[start : start + length]
        keys = slots[: start + length]
        causal = keys[None, :] <= queries[:, None]
        # Padding queries attend to themselves only, so no row of the softmax is empty (which would
        # give NaN, and NaN keys/values that poison later steps even under a mask).
        own = keys[None, :] == queries[:, None]
        return ((causal[None] & valid[:, None, : start + length]) | own[None])[:, None]

    logits = model(
        tokens,
        position_ids=positions[:, :prompt_len],
        attention_mask=mask_for(0, prompt_len),
        kv_cache=cache,
        logits_to_keep=1,
    )
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.empty(batch, 0, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        next_token = sample_next_token(logits[:, -1].float(), temperature, top_k, top_p, generator)
        next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
        out = torch.cat([out, next_token[:, None]], dim=1)
        if eos_token_id is not None:
            finished |= next_token == eos_token_id
            if bool(finished.all()):
                break
        if step == max_new_tokens - 1:
            break
        slot = prompt_len + step
        logits = model(
            next_token[:, None],
            position_ids=positions[:, slot : slot + 1],
            attention_mask=mask_for(slot, 1),
            kv_cache=cache,
        )
    results = []
    for row in out.tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        results.append(row)
    return results
