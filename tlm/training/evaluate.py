"""Evaluation: the validation pass a training run makes (`evaluate`, on every rank of any backend), and `tlm eval`:
loss and perplexity of a model directory on a prepared dataset or on raw text."""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.dataset import TokenRows, check_compatible, check_token_range, load_manifest
from data_pipeline.stream import make_batch
from tlm.training.backends import DistInfo
from tlm.checkpointing.model_dir import load_model_dir
from data_pipeline.errors import CheckpointError
from tlm.model.transformer import TransformerLM


@torch.no_grad()
def evaluate(backend: Any, rows: TokenRows, batch_size: int, max_batches: int | None, info: DistInfo,
             progress: bool = False) -> dict[str, float]:
    """Validation loss and perplexity over (up to max_batches x batch_size x world) rows of a split.

    Every rank runs the same number of forwards (a rank with no rows left runs a weightless one),
    because ZeRO-3 and FSDP2 gather parameters collectively inside forward.
    """
    world, rank = info.world_size, info.rank
    total = len(rows) if max_batches is None else min(len(rows), max_batches * batch_size * world)
    mine = np.arange(rank, total, world, dtype=np.int64)
    steps = math.ceil(math.ceil(total / world) / batch_size)
    # loss sum, tokens; and over full batches their mean losses' sum, sum of squares and count (for the SE)
    sums = torch.zeros(5, dtype=torch.float64, device=info.device)
    backend.train_mode(False)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="batch", desc="evaluating", file=sys.stderr, mininterval=1.0, leave=False)
    for i in range(steps):
        if bar is not None:
            bar.update(1)
        indices = mine[i * batch_size : (i + 1) * batch_size]
        weight = 1.0 if len(indices) else 0.0
        batch = make_batch(rows, indices if len(indices) else np.zeros(1, dtype=np.int64))
        batch = {k: v.to(info.device) for k, v in batch.items()}
        mask = batch.get("loss_mask")
        loss_sum = weight * backend.loss_sum(batch).double()
        tokens = weight * (mask.sum() if mask is not None else batch["labels"].numel())
        sums[0] += loss_sum
        sums[1] += tokens
        if len(indices) == batch_size:
            batch_mean = loss_sum / tokens
            sums[2:] += torch.stack([batch_mean, batch_mean**2, torch.ones_like(batch_mean)])
    if bar is not None:
        bar.close()
    backend.train_mode(True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(sums[1].item())}
    n = sums[4].item()
    if n >= 2:  # the standard error of the mean over batches (batches of neighbouring rows: a lower bound)
        variance = max(0.0, (sums[3].item() - sums[2].item() ** 2 / n) / (n - 1))
        result["val_loss_se"] = math.sqrt(variance / n)
    return result


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
