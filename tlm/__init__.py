"""tlm: a scalable pretraining system for small causal language models.

Packages, lowest first: `tlm_base` (errors, files, locks, schemas), `data_pipeline` (raw text -> tokenizer ->
shards -> stream; no torch at import), then `tlm.model`, `tlm.checkpointing`, `tlm.training`, `tlm.studies`,
`tlm.inference`, `tlm.cli`. Each imports only those below it. Importing `tlm` imports no torch: the model
classes below load on first use, so `tlm prepare` and `tlm --help` start in a fraction of a second.
"""

from pathlib import Path
from typing import Any

from tlm_base.errors import CheckpointError, ConfigError, ExportError, TLMError

__version__ = "0.1.0"
_MODEL = ("ModelConfig", "PRESETS", "get_preset", "TransformerLM")

__all__ = ["__version__", *_MODEL, "TLMError", "ConfigError", "CheckpointError", "ExportError"]


def data_dir(packaged: str, in_repo: str) -> Path:
    """A folder of tlm's data files (recipes, DeepSpeed JSON): inside the installed package (tlm/PACKAGED, in a wheel
    or a non-editable install), else at the top of the repository (IN_REPO) it runs from."""
    inside = Path(__file__).resolve().parent / packaged
    return inside if inside.is_dir() else Path(__file__).resolve().parent.parent / in_repo


RECIPES = data_dir("recipes", "configs")
"""The bundled recipes, named on the command line by their file name: `tlm train --config debug`."""


def __getattr__(name: str) -> Any:
    if name in _MODEL:
        import tlm.model

        return getattr(tlm.model, name)
    raise AttributeError(f"module 'tlm' has no attribute {name!r}")
