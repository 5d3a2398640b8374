"""The data pipeline: raw text -> BPE tokenizer -> packed Arrow shards -> a rank-aware, resumable stream."""

from pathlib import Path

CORPORA = Path(__file__).resolve().parent / "corpora"
DEMO_TRAIN = CORPORA / "gutenberg-demo.jsonl.xz"
DEMO_VAL = CORPORA / "gutenberg-val.jsonl.xz"
TINYSHAKESPEARE = CORPORA / "tinyshakespeare.txt.xz"
