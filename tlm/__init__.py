"""tlm: a scalable pretraining system for small causal language models.

Packages, lowest first: `data_pipeline` (errors, files, locks, schemas; raw text -> tokenizer -> shards ->
stream; no torch at import), then `tlm.model`, `tlm.checkpointing`, `tlm.training`, `tlm.studies`,
`tlm.inference`, `tlm.cli`. Each imports only those below it. Importing `tlm` imports no torch: the model
classes below load on first use, so `tlm prepare` and `tlm --help` start in a fraction of a second.
"""

from typing import Any

from tlm_base.errors import CheckpointError, ConfigError, ExportError, TLMError

__version__ = "0.1.0"
_MODEL = ("ModelConfig", "PRESETS", "get_preset", "TransformerLM")

__all__ = ["__version__", *_MODEL, "TLMError", "ConfigError", "CheckpointError", "ExportError"]


def __getattr__(name: str) -> Any:
    if name in _MODEL:
        import tlm.model

        return getattr(tlm.model, name)
    raise AttributeError(f"module 'tlm' has no attribute {name!r}")
