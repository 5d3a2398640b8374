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
from tlm.training.distributed import DistInfo
from tlm.checkpointing.model_dir import load_model_dir
from tlm_base.errors import CheckpointError, ConfigError
from tlm.model.transformer import TransformerLM


@torch.no_grad()
def evaluate(backend: Any, rows: TokenRows, batch_size: int, max_batches: int | None, info: DistInfo,
             progress: bool = False, token_bytes: np.ndarray | None = None, documents: str = "none",
             periodic_batches: int | None = None) -> dict[str, float]:
    """Validation loss, perplexity and (given each token id's UTF-8 byte count, `token_bytes`) bits per byte over
    the first (up to max_batches x batch_size) rows of a split, whatever the number of ranks.

    Bits per byte = the summed loss of the evaluated tokens / (ln 2 x the UTF-8 bytes of the text they decode
    to): the loss of every token, end-of-text predictions included (a boundary is information the bytes do not
    show), over the bytes of the text. Unlike loss per token it does not depend on the tokenizer, so models with
    different vocabularies compare. Every rank runs the same number of forwards (a rank with no rows left runs
    a weightless one), because ZeRO-3 and FSDP2 gather parameters collectively inside forward.

    With `periodic_batches` (the final evaluation of the whole split), also `val_loss_periodic`: the loss over its
    first periodic_batches batches, the rows every periodic evaluation covers, bit for bit what such an evaluation
    gives (a prefix of the same sum): so that a run's validation curve keeps one measure to its last step.
    """
    world, rank = info.world_size, info.rank
    total = len(rows) if max_batches is None else min(len(rows), max_batches * batch_size)
    batches = math.ceil(total / batch_size)
    # Whole batches go to the ranks in turn, so that a batch holds the same rows on any number of ranks, and their
    # figures are summed in batch order: the same tokens and the same loss, bit for bit, on 1, 2 or 3 ranks.
    per_batch = torch.zeros(batches, 3, dtype=torch.float64, device=info.device)  # loss sum, tokens, bytes
    steps = math.ceil(batches / world)  # every rank runs as many forwards (a weightless one when it has none left)
    # ZeRO-3 gathers parameters inside forward, once per loss chunk: there every forward holds batch_size rows (a
    # short or weightless batch padded with masked rows), so that every rank makes the same collectives
    even = getattr(backend, "gathers_in_forward", False)
    backend.train_mode(False)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="batch", desc="evaluating", file=sys.stderr, mininterval=1.0, leave=False)
    for i in range(steps):
        if bar is not None:
            bar.update(1)
        index = i * world + rank
        indices = np.arange(index * batch_size, min((index + 1) * batch_size, total), dtype=np.int64)
        padding = (batch_size if even else 1 if not len(indices) else 0) - len(indices)
        batch = make_batch(rows, np.concatenate([indices, np.zeros(max(padding, 0), dtype=np.int64)]),
                           documents=documents)
        if padding > 0 and even:  # the padded rows count for nothing
            real = torch.arange(len(batch["labels"]))[:, None] < len(indices)
            batch["loss_mask"] = batch.get("loss_mask", torch.ones_like(batch["labels"], dtype=torch.bool)) & real
        counted = 0.0
        if token_bytes is not None:
            held = token_bytes[batch["labels"].numpy()]
            counted = float((held * batch["loss_mask"].numpy() if "loss_mask" in batch else held).sum())
        batch = {k: v.to(info.device) for k, v in batch.items()}
        mask = batch.get("loss_mask")
        loss_sum = backend.loss_sum(batch).double()
        if len(indices):
            tokens = mask.sum().double() if mask is not None else torch.tensor(float(batch["labels"].numel()),
                                                                               dtype=torch.float64, device=info.device)
            per_batch[index, 0], per_batch[index, 1], per_batch[index, 2] = loss_sum, tokens, counted
    if bar is not None:
        bar.close()
    backend.train_mode(True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(per_batch)  # each batch's row comes from one rank: the sum of zeros and it is exact
    loss_total = tokens_total = bytes_total = 0.0
    means, squares, full = 0.0, 0.0, 0
    periodic = None
    for index, (loss_sum, tokens, counted) in enumerate(per_batch.tolist()):  # one host read, in batch order
        loss_total += loss_sum
        tokens_total += tokens
        if periodic_batches is not None and index + 1 == periodic_batches and index + 1 < batches:
            periodic = loss_total / tokens_total
        bytes_total += counted
        if min((index + 1) * batch_size, total) - index * batch_size == batch_size:
            mean = loss_sum / tokens
            means, squares, full = means + mean, squares + mean**2, full + 1
    loss = loss_total / tokens_total
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(tokens_total)}
    if periodic is not None:
        result["val_loss_periodic"] = periodic
    if bytes_total > 0:
        result["val_bpb"] = loss_total / (math.log(2) * bytes_total)
        result["val_bytes"] = int(bytes_total)
    if full >= 2:  # the standard error of the mean over batches (batches of neighbouring rows: a lower bound)
        variance = max(0.0, (squares - means**2 / full) / (full - 1))
        result["val_loss_se"] = math.sqrt(variance / full)
    return result


def byte_table(tokenizer_dir: str | Path, vocab_size: int) -> np.ndarray:
    """Each token id's UTF-8 byte count for the tokenizer in `tokenizer_dir`, padded with zeros to `vocab_size`
    (ids the tokenizer never emits)."""
    from data_pipeline.tokenizer_files import load_tokenizer, token_byte_lengths

    lengths = token_byte_lengths(load_tokenizer(tokenizer_dir))
    return np.pad(lengths, (0, max(0, vocab_size - len(lengths))))


def evaluate_parts(parts: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The validation figures of a mixture: overall (the parts' loss sums over their tokens, as one evaluation of
    all their rows would give) and per part as `val_loss/NAME`, `val_bpb/NAME`, `val_tokens/NAME`."""
    tokens = sum(r["val_tokens"] for r in parts.values())
    loss = sum(r["val_loss"] * r["val_tokens"] for r in parts.values()) / tokens
    result: dict[str, Any] = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}
    if all("val_bytes" in r for r in parts.values()):
        result["val_bytes"] = sum(r["val_bytes"] for r in parts.values())
        result["val_bpb"] = loss * tokens / (math.log(2) * result["val_bytes"])
    for name, r in parts.items():
        result[f"val_loss/{name}"] = r["val_loss"]
        result[f"val_tokens/{name}"] = r["val_tokens"]
        if "val_bpb" in r:
            result[f"val_bpb/{name}"] = r["val_bpb"]
    return result


class ModelRunner:
    """What `train.evaluate` needs of a backend, for a plain model (bf16 autocast on CUDA)."""

    def __init__(self, model: TransformerLM, device: torch.device) -> None:
        self.model, self.device = model, device

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            return self.model(batch["input_ids"], labels=batch["labels"], loss_mask=batch.get("loss_mask"),
                              attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"))

    def train_mode(self, training: bool) -> None:
        self.model.train(training)


class TransformersRunner:
    """What `evaluate` needs of a backend, for a transformers causal LM (its logits, fp32 cross-entropy)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"]).logits.float()
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        mask = batch.get("loss_mask")
        return (losses * mask.flatten().to(losses.dtype)).sum() if mask is not None else losses.sum()

    def train_mode(self, training: bool) -> None:
        self.model.train(training)


def is_transformers_folder(path: str | Path) -> bool:
    """A transformers model folder (config.json with a model_type), not a tlm model directory."""
    from tlm.checkpointing.model_dir import CONFIG_NAME

    return (Path(path) / "config.json").is_file() and not (Path(path) / CONFIG_NAME).is_file()


def _load_model(checkpoint: str, device: torch.device) -> tuple[Any, int, int | None, str | None]:
    """(runner, vocabulary size, trained length, end-of-text token) of a tlm model directory or a transformers
    folder."""
    if not is_transformers_folder(checkpoint):
        from tlm.checkpointing.model_dir import read_model_meta

        model = load_model_dir(checkpoint, device=device)
        trained = read_model_meta(checkpoint).get("trained_seq_len")
        return ModelRunner(model, device), model.config.vocab_size, trained, None
    try:
        import transformers
    except ImportError:
        raise CheckpointError(f"'{checkpoint}' is a transformers model folder; `pip install transformers` to "
                              "evaluate it") from None
    from data_pipeline.tokenizer_files import has_tokenizer, load_tokenizer, special_token_ids

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{checkpoint}: transformers cannot load this model ({e})") from None
    eot = None
    if has_tokenizer(checkpoint):
        eos = special_token_ids(checkpoint)["eos_token_id"]
        eot = load_tokenizer(checkpoint).id_to_token(eos) if eos is not None else None
    vocab = model.config.vocab_size
    trained = getattr(model.config, "tlm_trained_seq_len", None)  # a tlm export says the length it was trained at
    length = getattr(model.config, "max_position_embeddings", None)
    return TransformersRunner(model), vocab, trained or (min(512, length) if length else None), eot


def evaluate_checkpoint(checkpoint: str, data: Any, seq_len: int | None = None, split: str | None = None,
                        batch_size: int = 8, max_batches: int | None = None, device: torch.device | None = None,
                        text_field: str = "text") -> dict[str, Any]:
    """Evaluate `checkpoint` (a tlm model directory or a transformers model folder) on a prepared folder (its
    split) or on raw text (tokenized with the checkpoint's own tokenizer): loss, perplexity, bits per byte."""
    device = device or torch.device("cpu")
    runner, vocab_size, trained_len, eot_token = _load_model(checkpoint, device)
    context = getattr(runner.model.config, "max_position_embeddings", None)
    model_tokenizer = Path(checkpoint) / "tokenizer.json"
    with tempfile.TemporaryDirectory(prefix="tlm-eval-") as tmp:
        if isinstance(data, (str, Path)) and (Path(data) / "manifest.json").is_file():
            folder = Path(data)
            manifest = load_manifest(folder)
            sha = None
            if model_tokenizer.is_file():
                from data_pipeline.tokenizer import tokenizer_sha256

                sha = tokenizer_sha256(checkpoint)
            check_compatible(manifest, vocab_size, manifest["seq_len"], sha, where=str(folder))
            if context and manifest["seq_len"] > context:
                raise ConfigError(f"{folder} holds rows of seq_len {manifest['seq_len']}, past the model's context of "
                                  f"{context} (max_position_embeddings of {checkpoint}); evaluate raw text with "
                                  f"--seq_len {context} or less, or prepare it again with tlm prepare --seq_len {context}")
            split = split or ("val" if manifest["splits"]["val"]["rows"] else "train")
        else:
            if not model_tokenizer.is_file():
                raise CheckpointError(f"checkpoint '{checkpoint}' has no tokenizer to tokenize raw text with; "
                                      "give a prepared folder instead")
            from data_pipeline.prepare import PrepareConfig, prepare

            # Raw text is cut into rows of the length the model was trained at (512 when the folder predates
            # that record), not a fixed 512 that a model trained at 64 has never seen.
            seq_len = seq_len or min(trained_len or 512, context or 512)
            if context and seq_len > context:
                raise ConfigError(f"--seq_len {seq_len} exceeds the model's context of {context} (max_position_embeddings "
                                  f"of {checkpoint}); give --seq_len {context} or less")
            folder = Path(tmp) / "data"
            sources = [str(d) for d in data] if isinstance(data, (list, tuple)) else [str(data)]
            prepare(PrepareConfig(data=sources, tokenizer=str(checkpoint), out=str(folder), seq_len=seq_len, val=0.0,
                                  text_field=text_field, eot_token=eot_token), progress=False)
            split = "raw text"
        rows = TokenRows(folder, "train" if split == "raw text" else split)
        check_token_range(rows, vocab_size)
        info = DistInfo(0, 1, 0, device)
        token_bytes = byte_table(checkpoint, vocab_size) if model_tokenizer.is_file() else None
        with torch.no_grad():
            result = evaluate(runner, rows, batch_size, max_batches, info, progress=sys.stderr.isatty(),
                              token_bytes=token_bytes)
    return {"loss": result["val_loss"], "perplexity": result["val_ppl"], "bits_per_byte": result.get("val_bpb"),
            "tokens": result["val_tokens"], "bytes": result.get("val_bytes"), "loss_se": result.get("val_loss_se"),
            "rows": len(rows) if max_batches is None else min(len(rows), max_batches * batch_size),
            "split": split, "seq_len": rows.seq_len, "checkpoint": str(checkpoint)}
