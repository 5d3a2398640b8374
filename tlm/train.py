"""The training loop: data, backend, schedule, evaluation, checkpoints and logging for one run.

`train(config)` works the same as one plain process or under a launcher (torchrun, deepspeed, srun):
every rank runs this code, rank 0 writes the metrics, the consolidated model and the pointers.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import tlm
from data_pipeline.dataset import TokenRows, check_compatible
from data_pipeline.stream import TokenStream, make_batch
from tlm.backends import Backend, DistInfo, convert_to_universal, init_distributed, make_backend, token_loss_sum
from tlm.checkpoint import save_model_dir
from tlm.errors import CheckpointError, ConfigError
from tlm.fileio import atomic_write_json
from tlm.metrics import MetricsFile, WandbLogger, flops_per_token, peak_flops, progress_bar
from tlm.model import TransformerLM
from tlm.optim import lr_at
from tlm.preemption import StopRequest
from tlm.train_config import TrainConfig
from tlm.train_data import resolve_data
from tlm.train_state import (
    checkpoint_dir,
    find_resume,
    load_rng,
    mark_complete,
    prune,
    read_trainer_state,
    save_rng,
    write_trainer_state,
)

log = logging.getLogger("tlm")


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def evaluate(backend: Backend, rows: TokenRows, batch_size: int, max_batches: int | None, info: DistInfo) -> dict[str, float]:
    """Validation loss and perplexity over (up to max_batches x batch_size x world) rows of a split.

    Every rank runs the same number of forwards (a rank with no rows left runs a weightless one),
    because ZeRO-3 and FSDP2 gather parameters collectively inside forward.
    """
    world, rank = info.world_size, info.rank
    total = len(rows) if max_batches is None else min(len(rows), max_batches * batch_size * world)
    mine = np.arange(rank, total, world, dtype=np.int64)
    steps = math.ceil(math.ceil(total / world) / batch_size)
    sums = torch.zeros(2, dtype=torch.float64, device=info.device)
    backend.train_mode(False)
    for i in range(steps):
        indices = mine[i * batch_size : (i + 1) * batch_size]
        weight = 1.0 if len(indices) else 0.0
        batch = make_batch(rows, indices if len(indices) else np.zeros(1, dtype=np.int64))
        batch = {k: v.to(info.device) for k, v in batch.items()}
        logits = backend.forward(batch["input_ids"])
        mask = batch.get("loss_mask")
        sums[0] += weight * token_loss_sum(logits, batch["labels"], mask).double()
        sums[1] += weight * (mask.sum() if mask is not None else batch["labels"].numel())
    backend.train_mode(True)
    _all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(sums[1].item())}


def _model_config(config: TrainConfig, tokenizer_dir: Path | None):
    model_config = config.model_config()
    if tokenizer_dir is not None:
        from tlm.tokenizer import special_token_ids

        ids = {k: v for k, v in special_token_ids(tokenizer_dir).items() if k not in config.model}
        model_config = model_config.replace(**ids)
    return model_config


def save_checkpoint(run_dir: Path, step: int, backend: Backend, stream: TokenStream, config: TrainConfig,
                    model_config, tokenizer_dir: Path | None, info: DistInfo, extra: dict[str, Any]) -> Path:
    """Write a complete checkpoint on every rank; it becomes visible (COMPLETE, latest) only at the end."""
    path = checkpoint_dir(run_dir, step)
    if info.is_main:
        if path.exists():  # a leftover of a run killed while saving this very step
            shutil.rmtree(path)
        (path / "backend").mkdir(parents=True)
    _barrier()
    backend.save(path / "backend")
    save_rng(path, info.rank)
    state = backend.full_state_dict(path / "backend")
    if info.is_main:
        with torch.device("meta"):
            model = TransformerLM(model_config)
        model.load_state_dict(state, assign=True, strict=False)
        if model_config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        save_model_dir(model, path / "model", tokenizer_dir=tokenizer_dir, extra={"trained_steps": step})
        write_trainer_state(path, {
            "step": step,
            "world_size": info.world_size,
            "backend": config.train.backend,
            "zero_stage": config.train.zero_stage,
            "stream": stream.state_dict(),
            "config": config.to_dict(),
            "tlm_version": tlm.__version__,
            **extra,
        })
    _barrier()
    if info.is_main:
        mark_complete(run_dir, path)
        prune(run_dir, config.checkpoint.keep_last)
    _barrier()
    return path


def _sample(model_dir: Path, prompt: str, device: torch.device) -> str | None:
    from tlm.checkpoint import load_model_dir
    from tlm.generate import generate
    from tlm.tokenizer import has_tokenizer, load_tokenizer

    if not has_tokenizer(model_dir):
        return None
    model = load_model_dir(model_dir, device=device)
    tok = load_tokenizer(model_dir)
    ids = generate(model, [tok.encode(prompt).ids], max_new_tokens=48, temperature=0.8, top_k=50,
                   eos_token_id=model.config.eos_token_id, generator=torch.Generator(device=device).manual_seed(0))[0]
    return prompt + tok.decode(ids)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training described by `config`; returns its summary and logged history."""
    info = init_distributed(config)
    accumulation = config.micro_steps(info.world_size)
    micro = config.batch.micro_batch_size
    seq_len = config.data.seq_len
    global_batch = micro * accumulation * info.world_size
    run_dir = config.run_dir
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    prepared, tokenizer_dir = resolve_data(config, info.is_main)
    rows = TokenRows(prepared, "train", verify="sha256" if info.is_main else "size")
    manifest = rows.manifest
    if (manifest["mode"] == "pack") != config.data.pack:
        raise ConfigError(f"data.pack is {config.data.pack} but {prepared} was prepared in {manifest['mode']} mode")
    model_config = _model_config(config, tokenizer_dir)
    tok_sha = None
    if tokenizer_dir is not None:
        from data_pipeline.tokenizer import tokenizer_sha256

        tok_sha = tokenizer_sha256(tokenizer_dir)
    check_compatible(manifest, model_config.vocab_size, seq_len, tok_sha, where=str(prepared))
    val_rows = TokenRows(prepared, "val", verify="size") if manifest["splits"]["val"]["rows"] else None
    total_steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * len(rows) / global_batch))

    resume = find_resume(run_dir, config.checkpoint.resume)
    state = read_trainer_state(resume) if resume is not None else None
    load_universal = False
    if state is not None:
        plain = ("single", "ddp")  # one format: a single process resumes DDP's checkpoint and vice versa
        same = (state["backend"] == config.train.backend or {state["backend"], config.train.backend} <= set(plain))
        if not same or (config.train.backend == "deepspeed" and state["zero_stage"] != config.train.zero_stage):
            raise CheckpointError(f"{resume} was written by backend {state['backend']} (ZeRO {state['zero_stage']}); "
                                  f"this run uses {config.train.backend} (ZeRO {config.train.zero_stage})")
        load_universal = (state["world_size"] != info.world_size and config.train.backend == "deepspeed"
                          and config.train.zero_stage > 0)
        if load_universal and info.is_main:
            convert_to_universal(resume / "backend")
        _barrier()

    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    model = TransformerLM(model_config)
    backend = make_backend(model, config, info, accumulation, load_universal)
    stream = TokenStream(rows, micro, info.rank, info.world_size, seed=config.train.seed,
                         prefetch=config.data.prefetch, pin_memory=info.device.type == "cuda")
    step, tokens_seen = 0, 0
    if state is not None:
        backend.load(resume / "backend", state["world_size"])
        stream.load_state_dict(state["stream"])
        step, tokens_seen = state["step"], state.get("tokens_seen", 0)
        if not load_rng(resume, info.rank):
            torch.manual_seed(config.train.seed + step)
        log.info("resumed from %s at step %d (%d samples consumed)", resume, step, stream.consumed_samples)

    if info.is_main and info.device.type == "cpu" and config.train.precision == "bf16" \
            and "AVX512" not in torch.backends.cpu.get_cpu_capability():
        log.warning("this CPU (%s) has no AVX-512 BF16: bf16 matmuls are emulated and can be 10-45x slower than "
                    "fp32; consider --train.precision=fp32", torch.backends.cpu.get_cpu_capability())
    flops = flops_per_token(model_config, seq_len)
    peak = peak_flops(torch.cuda.get_device_name(info.device)) if info.device.type == "cuda" else None
    metrics = MetricsFile(run_dir / "metrics.jsonl") if info.is_main else None
    wandb = WandbLogger(config.logging.wandb, config.logging.wandb_project, config.name, config.to_dict(), run_dir) \
        if info.is_main else None
    interactive = info.is_main and config.logging.progress and sys.stderr.isatty()
    bar = progress_bar(total_steps, step, interactive)
    if info.is_main:
        log.info("training %s: %s parameters, %d steps of %d sequences x %d tokens (%d ranks x micro %d x accumulation %d), "
                 "backend %s%s, %s", config.name, f"{model.num_parameters():,}", total_steps, global_batch, seq_len,
                 info.world_size, micro, accumulation, config.train.backend,
                 f" ZeRO-{config.train.zero_stage}" if config.train.backend == "deepspeed" else "", config.train.precision)

    history: list[dict[str, Any]] = []
    window_loss = torch.zeros((), dtype=torch.float64, device=info.device)
    window_tokens = torch.zeros((), dtype=torch.float64, device=info.device)
    window_start, window_steps = time.perf_counter(), 0
    last_eval: dict[str, float] = {}
    last_saved = step if state is not None else -1
    packed = manifest["mode"] == "pack"

    def record(values: dict[str, Any]) -> None:
        if info.is_main:
            metrics.write(values)
            wandb.log({k: v for k, v in values.items() if k != "step"}, step=values["step"])
        history.append(values)

    def run_eval() -> None:
        nonlocal last_eval
        if val_rows is None:
            return
        last_eval = evaluate(backend, val_rows, config.eval.batch_size or micro, config.eval.max_batches, info)
        record({"step": step, **last_eval, "tokens_seen": tokens_seen})
        if info.is_main and not interactive:
            log.info("step %d: val loss %.4f, perplexity %.2f", step, last_eval["val_loss"], last_eval["val_ppl"])

    def checkpoint() -> Path:
        nonlocal last_saved
        path = save_checkpoint(run_dir, step, backend, stream, config, model_config, tokenizer_dir, info,
                               {"tokens_seen": tokens_seen, "total_steps": total_steps, **last_eval})
        last_saved = step
        return path

    stop_at = min(total_steps, config.train.stop_at or total_steps)
    if config.eval.at_start and step == 0:
        run_eval()
    stop = StopRequest().install()
    stopped = None
    try:
        while step < stop_at:
            lr = lr_at(step, total_steps, config.optim.lr, config.schedule)
            backend.set_lr(lr)
            batches = [next(stream) for _ in range(accumulation)]
            if packed:
                step_tokens = torch.tensor(float(global_batch * seq_len), dtype=torch.float64, device=info.device)
            else:
                step_tokens = _all_reduce(torch.tensor(float(sum(b["loss_mask"].sum() for b in batches)),
                                                       dtype=torch.float64, device=info.device))
            scale = info.world_size / step_tokens.item() if not packed else info.world_size / (global_batch * seq_len)
            for i, batch in enumerate(batches):
                window_loss += backend.micro_step(batch, scale, last=i == accumulation - 1).double()
            grad_norm = backend.optimizer_step()
            window_tokens += step_tokens
            step += 1
            window_steps += 1
            tokens_seen += global_batch * seq_len
            bar.update(1)

            if step % config.logging.log_every == 0 or step == total_steps:
                sums = _all_reduce(torch.stack([window_loss, window_tokens / info.world_size]))
                seconds = time.perf_counter() - window_start
                tokens_per_s = window_steps * global_batch * seq_len / seconds
                values = {"step": step, "loss": (sums[0] / sums[1]).item(), "lr": lr,
                          "grad_norm": None if grad_norm is None else float(grad_norm),
                          "tokens_seen": tokens_seen, "tokens_per_s": tokens_per_s, "step_time": seconds / window_steps,
                          "epoch": stream.epoch}
                if peak is not None:
                    values["mfu"] = flops * tokens_per_s / info.world_size / peak
                record(values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                if info.is_main and not interactive:
                    log.info("step %d/%d: loss %.4f, lr %.2e, %s tokens/s", step, total_steps, values["loss"], lr,
                             f"{tokens_per_s:,.0f}")
                window_loss.zero_()
                window_tokens.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if config.eval.every and step % config.eval.every == 0 and step < total_steps:
                run_eval()
            if config.checkpoint.every and step % config.checkpoint.every == 0 and step < total_steps:
                checkpoint()
            stopped = stop.agreed()
            if stopped:
                if info.is_main:
                    log.warning("stopping at step %d (%s); rerun the same command to resume", step, stopped)
                break
    finally:
        stop.uninstall()
    bar.close()
    stream.close()

    if state is not None and step == state["step"]:
        if info.is_main:
            log.info("%s is already at step %d; nothing to train", run_dir, step)
        last_eval = {k: state[k] for k in ("val_loss", "val_ppl", "val_tokens") if k in state}
        final_path = resume
    else:
        if step == total_steps and not stopped:
            run_eval()
        final_path = checkpoint() if last_saved != step else checkpoint_dir(run_dir, step)

    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "steps": step, "total_steps": total_steps, "complete": step == total_steps,
        "tokens_seen": tokens_seen, "world_size": info.world_size, "stopped": stopped,
        "backend": config.train.backend, "checkpoint": str(final_path), "model": str(final_path / "model"),
        "num_parameters": model.num_parameters(), "flops_per_token": flops, **last_eval,
    }
    losses = [h["loss"] for h in history if "loss" in h]
    if losses:
        summary["final_loss"] = losses[-1]
        speeds = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
        summary["tokens_per_s"] = speeds[-1]
        if peak is not None:
            summary["mfu"] = flops * speeds[-1] / info.world_size / peak
    summary["peak_memory_mb"] = (torch.cuda.max_memory_allocated(info.device) / 2**20 if info.device.type == "cuda"
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if info.is_main and config.logging.sample_prompt:
        summary["sample"] = _sample(final_path / "model", config.logging.sample_prompt, info.device)
    if info.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
        metrics.close()
        wandb.finish()
    if hasattr(backend, "engine") and hasattr(backend.engine, "destroy"):
        backend.engine.destroy()
    summary["history"] = history
    return summary


def shutdown() -> None:
    """End the process group cleanly (without it, gloo runs sometimes abort at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
