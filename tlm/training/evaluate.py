"""`tlm eval`: loss and perplexity of a model directory on a prepared dataset or on raw text."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from data_pipeline.dataset import TokenRows, check_compatible, check_token_range, load_manifest
from tlm.training.backends import DistInfo
from tlm.checkpointing.model_dir import load_model_dir
from data_pipeline.errors import CheckpointError
from tlm.model.transformer import TransformerLM


class ModelRunner:
    """What `train.evaluate` needs of a backend, for a plain model (bf16 autocast on CUDA)."""

    def __init__(self, model: TransformerLM, device: torch.device) -> None:
        self.model, self.device = model, device

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            return self.model(batch["input_ids"], labels=batch["labels"], loss_mask=batch.get("loss_mask"))

    def train_mode(self, training: bool) -> None:
        self.model.train(training)


def evaluate_checkpoint(checkpoint: str, data: Any, seq_len: int | None = None, split: str | None = None,
                        batch_size: int = 8, max_batches: int | None = None, device: torch.device | None = None,
                        text_field: str = "text") -> dict[str, Any]:
    """Evaluate `checkpoint` on a prepared folder (its split) or on raw text (tokenized with its tokenizer)."""
    from tlm.training.trainer import evaluate

    device = device or torch.device("cpu")
    model = load_model_dir(checkpoint, device=device)
    model_tokenizer = Path(checkpoint) / "tokenizer.json"
    with tempfile.TemporaryDirectory(prefix="tlm-eval-") as tmp:
        if isinstance(data, (str, Path)) and (Path(data) / "manifest.json").is_file():
            folder = Path(data)
            manifest = load_manifest(folder)
            sha = None
            if model_tokenizer.is_file():
                from data_pipeline.tokenizer import tokenizer_sha256

                sha = tokenizer_sha256(checkpoint)
            check_compatible(manifest, model.config.vocab_size, manifest["seq_len"], sha, where=str(folder))
            split = split or ("val" if manifest["splits"]["val"]["rows"] else "train")
        else:
            if not model_tokenizer.is_file():
                raise CheckpointError(f"checkpoint '{checkpoint}' has no tokenizer to tokenize raw text with; "
                                      "give a prepared folder instead")
            from data_pipeline.prepare import PrepareConfig, prepare
            from tlm.checkpointing.model_dir import read_model_meta

            # Raw text is cut into rows of the length the model was trained at (512 when the folder predates
            # that record), not a fixed 512 that a model trained at 64 has never seen.
            seq_len = seq_len or read_model_meta(checkpoint).get("trained_seq_len") or 512
            folder = Path(tmp) / "data"
            sources = [str(d) for d in data] if isinstance(data, (list, tuple)) else [str(data)]
            prepare(PrepareConfig(data=sources, tokenizer=str(checkpoint), out=str(folder), seq_len=seq_len, val=0.0,
                                  text_field=text_field), progress=False)
            split = "raw text"
        rows = TokenRows(folder, "train" if split == "raw text" else split)
        check_token_range(rows, model.config.vocab_size)
        info = DistInfo(0, 1, 0, device)
        result = evaluate(ModelRunner(model, device), rows, batch_size, max_batches, info, progress=sys.stderr.isatty())
    return {"loss": result["val_loss"], "perplexity": result["val_ppl"], "tokens": result["val_tokens"],
            "loss_se": result.get("val_loss_se"),
            "rows": len(rows) if max_batches is None else min(len(rows), max_batches * batch_size),
            "split": split, "seq_len": rows.seq_len, "checkpoint": str(checkpoint)}
