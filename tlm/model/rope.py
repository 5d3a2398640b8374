"""Rotary position embeddings (RoPE), plain and YaRN-scaled, with Hugging Face semantics.

Layout: the half-split `rotate_half` form of transformers' Llama (dimension i pairs with i + D/2), not
interleaved complex pairs, so exported weights need no permutation of q_proj / k_proj rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tlm.model.config import ModelConfig


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/D) for i in [0, D/2): the per-pair rotation speeds of plain RoPE (fp32)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))


def yarn_inv_freq(head_dim: int, theta: float, rope_scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN frequencies and attention factor, computed as transformers' `_compute_yarn_parameters` does.

    Pairs that rotate many times within the trained context (high frequency, > beta_fast turns) keep
    their speed (extrapolation); pairs that rotate less than beta_slow turns are slowed by `factor`
    (interpolation); a linear ramp blends the band between. cos and sin are then multiplied by the
    attention factor (0.1 ln(factor) + 1 unless given), which sharpens attention at long range.
    """
    factor = float(rope_scaling["factor"])
    original = rope_scaling["original_max_position_embeddings"]
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1
    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits `num_rotations` times into the original context.
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(dtype=torch.float32) / head_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def compute_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) for a config: YaRN when `rope_scaling` is set, plain RoPE otherwise."""
    if config.rope_scaling is not None:
        return yarn_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    return default_inv_freq(config.head_dim, config.rope_theta), 1.0


class RotaryEmbedding(nn.Module):
    """Turns position ids into (cos, sin) of shape (batch or 1, seq, head_dim)."""

    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = compute_inv_freq(config)
        # Not persistent: derived from the config, so checkpoints do not carry it.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # inv_freq is derived from the config, so rebuild it after every move or cast: a model-wide
        # cast (model.to(torch.bfloat16)) would round it to bf16 and shift every position's angle, and
        # `to_empty` (meta-device init, loading) would leave it uninitialised.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = compute_inv_freq(self.config)[0].to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp32 whatever the activation dtype (autocast off): position * freq loses precision
        # in bf16 beyond a few hundred positions. The result is cast to the activation dtype, because
        # fp32 cos/sin would promote bf16 q/k back to fp32.
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].to(torch.float32) * self.inv_freq.to(position_ids.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k of shape (batch, heads, seq, head_dim) by the angles in cos/sin (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
