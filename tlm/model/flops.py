"""The model's counts: the weights every token multiplies through, training FLOPs per token, the devices' peak
FLOP/s (for MFU), and the table of presets with their parameter counts.

FLOPs per token (forward + backward = 3 x forward), the PaLM / nanoGPT accounting:

    6 * N_matmul + 12 * num_hidden_layers * (num_attention_heads * head_dim) * seq_len

N_matmul counts the weights every token multiplies through: the q/k/v/o and MLP projections of every
layer plus the output projection (hidden x vocab, counted once even when tied to the embedding; the
embedding lookup itself is free). The second term is attention's QK^T and AV products over the full
seq_len window (causal masking is not discounted, as in PaLM's MFU). MFU = FLOPs per token x tokens/s
/ the device's peak dense bf16 FLOP/s, from the table below; CPUs have no stated peak (tokens/s only).
"""

from __future__ import annotations

from typing import Any

import torch

from tlm.model.config import PRESETS, ModelConfig, get_preset
from tlm.model.transformer import TransformerLM

# Dense bf16 peak FLOP/s per device (vendor datasheets, SXM / no sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def matmul_params(config: ModelConfig) -> int:
    h, d = config.hidden_size, config.head_dim
    attention = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = (3 if config.mlp == "swiglu" else 2) * h * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + h * config.vocab_size


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (see the module docstring)."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matmul_params(config) + attention


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device, matched by name (None when unknown, e.g. CPUs)."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name.upper():
            return value
    return None


def preset_table() -> dict[str, dict[str, Any]]:
    """Every preset's resolved config with its parameter count (built on the meta device: nothing allocated)."""
    table = {}
    for name in PRESETS:
        config = get_preset(name)
        with torch.device("meta"):
            parameters = TransformerLM(config).num_parameters()
        table[name] = {"num_parameters": parameters,
                       "train_flops_per_token_at_512": flops_per_token(config, min(512, config.max_position_embeddings)),
                       **config.to_dict()}
    return table
