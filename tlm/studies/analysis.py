"""Analyses of an ablation run that need its trained model, cached in the run's analysis.json.

Loss by position, a linear position probe on every layer, perplexity at 2-16x the trained length with and
without YaRN, and decode speed with a long KV cache. Computed from the run's model the first time the report
needs them and kept, so that the small files of a run regenerate the report without the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tlm.studies.catalogue import YARN_FACTORS
from tlm_base.errors import TLMError
from tlm_base.fileio import atomic_write_json
from tlm_base.schema import PosInt, Schema, load_json_text, parse
from tlm.checkpointing.layout import read_latest


def _latest_model(run_dir: Path) -> Path | None:
    latest = read_latest(run_dir)
    if latest is None:
        return None
    model = latest / "model"
    return model if model.is_dir() else None


def long_windows(model_dir: Path, length: int, count: int) -> torch.Tensor:
    """`count` windows of `length` + 1 tokens from the bundled held-out books (never across two books)."""
    import lzma

    from data_pipeline import DEMO_VAL
    from data_pipeline.tokenizer_files import load_tokenizer

    tok = load_tokenizer(model_dir)
    books = [json.loads(line)["text"] for line in lzma.open(DEMO_VAL, "rt", encoding="utf-8")]
    ids = [tok.encode(book).ids for book in books]
    windows = []
    while len(windows) < count:
        before = len(windows)
        for book in ids:
            start = (len(windows) // len(ids)) * (length + 1)
            if start + length + 1 <= len(book) and len(windows) < count:
                windows.append(book[start : start + length + 1])
        if len(windows) == before:
            break
    return torch.tensor(windows)


@torch.no_grad()
def _position_losses(model, windows: torch.Tensor) -> torch.Tensor:
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none").view(windows.shape[0], -1)


def _ridge_r2(hidden: torch.Tensor) -> float:
    """Held-out R^2 of a ridge regression from hidden states (batch, seq, width) to the position index: fitted
    on the first half of the windows, scored on the second."""
    hidden = hidden.double()
    batch, seq, width = hidden.shape
    positions = torch.arange(seq, dtype=torch.float64).repeat(batch, 1)
    half = batch // 2
    x_train, y_train = hidden[:half].reshape(-1, width), positions[:half].reshape(-1)
    x_test, y_test = hidden[half:].reshape(-1, width), positions[half:].reshape(-1)
    mu, y_mu = x_train.mean(0), y_train.mean()
    xt = x_train - mu
    weights = torch.linalg.solve(xt.T @ xt + 1e-3 * torch.eye(width, dtype=torch.float64), xt.T @ (y_train - y_mu))
    predicted = (x_test - mu) @ weights + y_mu
    return float(1 - ((predicted - y_test) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum())


@torch.no_grad()
def position_probes(model, windows: torch.Tensor) -> list[float]:
    """The position probe's R^2 on the input of every layer and on the final hidden states: [embeddings,
    after layer 1, ..., after layer L] (Haviv et al. 2022 find a NoPE model's position in its middle layers)."""
    captured: list[torch.Tensor] = []
    hooks = [model.layers[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))]
    hooks += [layer.register_forward_hook(lambda m, args, out: captured.append(out)) for layer in model.layers]
    model(windows[:, :-1])
    for hook in hooks:
        hook.remove()
    return [_ridge_r2(h) for h in captured]


@torch.no_grad()
def decode_speed(model, context: int = 4096, new_tokens: int = 32, repeats: int = 3) -> dict[str, Any]:
    """Decode tokens/s of one sequence after a `context`-token prompt (KV cache filled): the fastest of
    `repeats`, timing generate(new_tokens + 1) minus generate(1), so the prefill cancels."""
    import time

    from tlm.model.generate import generate

    prompt = [list(range(1, context + 1))]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(model, prompt, max_new_tokens=1)
        t1 = time.perf_counter()
        generate(model, prompt, max_new_tokens=new_tokens + 1)
        t2 = time.perf_counter()
        times.append((t2 - t1) - (t1 - t0))
    best = max(min(times), 1e-9)
    return {"context": context, "new_tokens": new_tokens, "tokens_per_s": new_tokens / best,
            "threads": torch.get_num_threads(), "device": "cpu", "dtype": "float32"}


class LongContextRow(Schema):
    length: PosInt
    windows: PosInt
    plain: float
    yarn: float


class AnalysisFile(Schema):
    """analysis.json, as cached beside a run (kept with the report's evidence)."""

    seq_len: PosInt
    loss_by_position: list[float]
    position_probe_layers: list[float]
    long_context: list[LongContextRow]
    decode: dict[str, Any] | None = None


def analyse(run_dir: Path, seq_len: int, windows: int = 16) -> dict[str, Any]:
    """analysis.json of a run: loss by position and the position probe at its training length, and
    long-context perplexity at 1, 2, 4, 8 x that length with and without YaRN. Cached next to the run."""
    path = run_dir / "analysis.json"
    if path.is_file():
        fix = "delete it to compute it again from the run's model"
        data = load_json_text(path, TLMError, fix)
        parse(AnalysisFile, data, str(path), TLMError, fix)
        return data
    model_dir = _latest_model(run_dir)
    if model_dir is None:
        return {}
    from tlm.checkpointing.model_dir import load_model_dir

    model = load_model_dir(model_dir)
    base = long_windows(model_dir, seq_len, windows * 2)
    result: dict[str, Any] = {"seq_len": seq_len, "loss_by_position": _position_losses(model, base).mean(0).tolist(),
                              "position_probe_layers": position_probes(model, base), "long_context": [],
                              "decode": decode_speed(model)}
    if model.config.position_embedding == "rope":
        for factor in (1, *YARN_FACTORS):
            length = seq_len * factor
            data = long_windows(model_dir, length, windows)
            if len(data) == 0:
                continue
            row = {"length": length, "windows": len(data), "plain": _position_losses(model, data).mean().item()}
            if factor > 1:
                yarn = load_model_dir(model_dir, rope_scaling={"factor": float(factor),
                                                               "original_max_position_embeddings": seq_len})
                row["yarn"] = _position_losses(yarn, data).mean().item()
            else:
                row["yarn"] = row["plain"]
            result["long_context"].append(row)
    atomic_write_json(path, result)
    return result


EVAL_NOISE = "eval_noise.json"


@torch.no_grad()
def eval_noise(run_a: Path, run_b: Path, prepared: Path, batch_size: int = 16) -> dict[str, Any]:
    """How much evaluation noise is in a comparison of two runs: both models' final losses on every batch of the
    validation split, the standard error of each mean over batches, and the standard error of the mean of their
    per-batch difference (what a paired comparison on the same tokens is subject to)."""
    import math

    import numpy as np

    from data_pipeline.dataset import TokenRows
    from data_pipeline.stream import make_batch
    from tlm.checkpointing.model_dir import load_model_dir

    rows = TokenRows(prepared, "val", verify="size")
    models = [load_model_dir(_latest_model(run) or run, device="cpu") for run in (run_a, run_b)]
    losses: list[list[float]] = [[], []]
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        batch = make_batch(rows, np.arange(start, start + batch_size))
        for i, model in enumerate(models):
            total = model(batch["input_ids"], labels=batch["labels"])
            losses[i].append(float(total) / batch["labels"].numel())
    a, b = np.array(losses[0]), np.array(losses[1])
    n = len(a)

    def se(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / math.sqrt(len(x)))

    return {"runs": [run_a.name, run_b.name], "batches": n, "tokens": n * batch_size * (rows.row_length - 1),
            "mean": [float(a.mean()), float(b.mean())], "se_of_each_mean": [se(a), se(b)],
            "se_of_paired_difference": se(b - a), "difference": float((b - a).mean()),
            "note": "batches of neighbouring rows are correlated: standard errors over them are lower bounds"}
