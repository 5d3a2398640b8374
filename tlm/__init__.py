"""tlm: a scalable pretraining system for small causal language models."""

__version__ = "0.1.0"

from tlm.config import ModelConfig, PRESETS, get_preset  # noqa: E402
from tlm.errors import CheckpointError, ConfigError, ExportError, TLMError  # noqa: E402
from tlm.model import TransformerLM  # noqa: E402

__all__ = [
    "__version__",
    "ModelConfig",
    "PRESETS",
    "get_preset",
    "TransformerLM",
    "TLMError",
    "ConfigError",
    "CheckpointError",
    "ExportError",
]
