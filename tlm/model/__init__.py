"""The model: configuration and presets, the Llama-style TransformerLM, RoPE/YaRN, the loss, and generation.

No distributed code lives here: training backends wrap the model from outside.
"""

from tlm.model.config import PRESETS, ModelConfig, get_preset
from tlm.model.transformer import TransformerLM

__all__ = ["PRESETS", "ModelConfig", "TransformerLM", "get_preset"]
