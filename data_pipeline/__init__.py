"""The data pipeline: raw text -> BPE tokenizer -> packed Arrow shards -> a rank-aware, resumable stream.

It stands on `tlm_base` (errors, files, locks, schemas) and never imports `tlm`; importing it (or running
`tlm prepare` / `tlm tokenizer`) does not import torch; only `data_pipeline.stream`, the bridge to training, does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CORPORA = Path(__file__).resolve().parent / "corpora"
DEMO_TRAIN = CORPORA / "gutenberg-demo.jsonl.xz"
DEMO_VAL = CORPORA / "gutenberg-val.jsonl.xz"
TINYSHAKESPEARE = CORPORA / "tinyshakespeare.txt.xz"


def default_data(data: Any = None, val_data: Any = None, val: float | int | None = None) -> tuple[Any, Any, float | int]:
    """(data, val_data, val) with the defaults filled in, stated once for `tlm prepare`, `tlm tokenizer` and
    training on first use: no data means the bundled Gutenberg corpus, validated on its separate held-out
    books unless a hold-out `val` is asked for; `val` defaults to 1% of the documents, or none when
    `val_data` is given."""
    if data is None:
        data = str(DEMO_TRAIN)
        if val is None and val_data is None:
            val_data = str(DEMO_VAL)
    if val is None:
        val = 0.0 if val_data is not None else 0.01
    return data, val_data, val
