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
from tlm.training import faults
from data_pipeline.dataset import TokenRows, check_compatible, check_token_range
from data_pipeline.stream import TokenStream, make_batch
from tlm.training.backends import Backend, DistInfo, convert_to_universal, from_rank0, init_distributed, make_backend
from tlm.checkpointing.model_dir import read_model_meta, save_model_dir
from data_pipeline.errors import CheckpointError, ConfigError, RankAgreedError, TLMError, TrainingError
from data_pipeline.fileio import DiskFullError, atomic_write_json, human_bytes, free_bytes
from data_pipeline.locks import FolderLock
from tlm.training.metrics import MetricsFile, WandbLogger, flops_per_token, peak_flops, progress_bar
from tlm.model.transformer import TransformerLM
from tlm.training.optim import lr_at
from tlm.training.preemption import INTERRUPTED, StopRequest
from tlm.checkpointing.resume_check import check_config, check_data, diff_lines, model_changes
from tlm.training.config import TrainConfig
from tlm.training.data import resolve_data
from tlm.checkpointing.checkpoints import (
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
def evaluate(backend: Backend, rows: TokenRows, batch_size: int, max_batches: int | None, info: DistInfo,
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
    _all_reduce(sums)
    loss = (sums[0] / sums[1]).item()
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(sums[1].item())}
    n = sums[4].item()
    if n >= 2:  # the standard error of the mean over batches (batches of neighbouring rows: a lower bound)
        variance = max(0.0, (sums[3].item() - sums[2].item() ** 2 / n) / (n - 1))
        result["val_loss_se"] = math.sqrt(variance / n)
    return result


def _model_config(config: TrainConfig, tokenizer_dir: Path | None):
    model_config = config.model_config()
    if tokenizer_dir is not None:
        from data_pipeline.tokenizer_files import special_token_ids

        ids = {k: v for k, v in special_token_ids(tokenizer_dir).items() if k not in config.model}
        model_config = model_config.replace(**ids)
    return model_config


def save_checkpoint(run_dir: Path, step: int, backend: Backend, stream: TokenStream, config: TrainConfig,
                    model_config, tokenizer_dir: Path | None, info: DistInfo, extra: dict[str, Any]) -> Path:
    """Write a complete checkpoint on every rank; it becomes visible (COMPLETE, latest) only at the end.

    A write that fails (a full disk, a quota, an I/O error) removes what it wrote and raises a
    CheckpointError that names the failure; the previous checkpoint is untouched.
    """
    path = checkpoint_dir(run_dir, step)
    try:
        if info.is_main:
            if path.exists():  # a leftover of a run killed while saving this very step
                shutil.rmtree(path)
            (path / "backend").mkdir(parents=True)
        _barrier()
        backend.save(path / "backend")
        save_rng(path, info.rank)
        state = backend.full_state_dict(path / "backend")
        if faults.hit(faults.active(), "kill_in_save", step, info.rank):
            faults.kill_self(f"while writing the checkpoint of step {step}")
        if faults.hit(faults.active(), "stall_in_save", step, info.rank):
            time.sleep(60)
        if info.is_main:
            with torch.device("meta"):
                model = TransformerLM(model_config)
            model.load_state_dict(state, assign=True, strict=False)
            if model_config.tie_word_embeddings:
                model.lm_head.weight = model.embed_tokens.weight
            save_model_dir(model, path / "model", tokenizer_dir=tokenizer_dir,
                           extra={"trained_steps": step, "trained_seq_len": config.data.seq_len})
            write_trainer_state(path, {
                "step": step,
                "world_size": info.world_size,
                "backend": config.train.backend,
                "zero_stage": config.train.zero_stage,
                "stream": stream.state_dict(),
                "config": config.to_dict(),
                "model": model_config.to_dict(),
                "tlm_version": tlm.__version__,
                **extra,
            })
        _barrier()
        if info.is_main:
            mark_complete(run_dir, path)
    except OSError as e:
        if info.is_main:
            shutil.rmtree(path, ignore_errors=True)  # free the space a full disk needs back
        previous = find_resume(run_dir, "auto") if info.is_main else None
        kept = f"the previous checkpoint {previous} is intact" if previous else "there is no previous checkpoint"
        if isinstance(e, DiskFullError):
            what = f"{e.what} writing {e.path} ({human_bytes(free_bytes(path))} free there)"
            then = "; free some space and rerun the same command to resume from it"
        else:
            what, then = f"{e.strerror or e} ({type(e).__name__}, errno {e.errno})", ""
        raise CheckpointError(f"could not write the checkpoint of step {step} in {path}: {what}; {kept}{then}") from e
    if info.is_main:
        prune(run_dir, config.checkpoint.keep_last)
    _barrier()
    return path


def _sample(model_dir: Path, prompt: str, device: torch.device) -> str | None:
    from tlm.checkpointing.model_dir import load_model_dir
    from tlm.model.generate import generate
    from data_pipeline.tokenizer_files import has_tokenizer, load_tokenizer

    if not has_tokenizer(model_dir):
        return None
    model = load_model_dir(model_dir, device=device)
    tok = load_tokenizer(model_dir)
    ids = generate(model, [tok.encode(prompt).ids], max_new_tokens=48, temperature=0.8, top_k=50,
                   eos_token_id=model.config.eos_token_id, generator=torch.Generator(device=device).manual_seed(0))[0]
    return prompt + tok.decode(ids)


class Trainer:
    """One run: own the run folder, check a resume's config, set up data, model, backend, stream and logging,
    then `run()` it."""

    def __init__(self, config: TrainConfig) -> None:
        self.started = time.perf_counter()
        self.config = config
        self.info = info = init_distributed(config)
        self.accumulation = config.micro_steps(info.world_size)
        self.micro = config.batch.micro_batch_size
        self.seq_len = config.data.seq_len
        self.global_batch = self.micro * self.accumulation * info.world_size
        self.run_dir = config.run_dir
        self.lock = self._own_run_dir()
        try:
            self._check_resume()
            self._setup_data()
            self._setup_model_and_resume()
            self._setup_logging()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the run folder up (the process's end does it too, whatever the end)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _own_run_dir(self) -> FolderLock | None:
        """Rank 0 locks RUN/.lock; every rank learns whether it could, and all stop together if not."""
        lock, error = None, None
        if self.info.is_main:
            try:
                lock = FolderLock(self.run_dir, "run folder", hint="wait for it to finish, stop it (Ctrl-C or SIGTERM "
                                  "checkpoint it), or give this run another --logging.run_dir").acquire()
            except TLMError as e:
                error = str(e)
        error = from_rank0(error)
        if error:
            raise RankAgreedError(error)
        return lock

    def _check_resume(self) -> None:
        """Find the checkpoint to resume and prove this run's config may continue it, before any work."""
        config, info = self.config, self.info
        self.resume = find_resume(self.run_dir, config.checkpoint.resume)
        self.state = state = read_trainer_state(self.resume) if self.resume is not None else None
        self.change_log: list[dict[str, Any]] = list(state.get("config_changes", [])) if state else []
        self.changes: dict[str, tuple[Any, Any]] = {}
        if state is None:
            return
        plain = ("single", "ddp")  # one format: a single process resumes DDP's checkpoint and vice versa
        same = state["backend"] == config.train.backend or {state["backend"], config.train.backend} <= set(plain)
        if not same or (config.train.backend == "deepspeed" and state["zero_stage"] != config.train.zero_stage):
            raise CheckpointError(f"{self.resume} was written by backend {state['backend']} (ZeRO {state['zero_stage']}); "
                                  f"this run uses {config.train.backend} (ZeRO {config.train.zero_stage})")
        self.saved_model = state.get("model") or read_model_meta(self.resume / "model")["model"]
        self.changes = check_config(self.resume, state["config"], config.to_dict(), self.saved_model,
                                    config.model_config().to_dict(), config.checkpoint.allow_change)
        if self.changes:
            self.change_log.append({"step": state["step"], "changes": {k: list(v) for k, v in self.changes.items()}})
            if info.is_main:
                log.warning("resuming with changed settings (allowed): %s", diff_lines(self.changes))

    def _setup_data(self) -> None:
        config, info = self.config, self.info
        expect = self.state.get("data") if self.state else None
        prepared, self.tokenizer_dir = resolve_data(config, info.is_main, expect)
        verify = "sha256" if info.is_main else "size"
        self.rows = TokenRows(prepared, "train", verify=verify)
        manifest = self.rows.manifest
        if (manifest["mode"] == "pack") != config.data.pack:
            raise ConfigError(f"data.pack is {config.data.pack} but {prepared} was prepared in {manifest['mode']} mode")
        self.packed = manifest["mode"] == "pack"
        self.model_config = _model_config(config, self.tokenizer_dir)
        tok_sha = None
        if self.tokenizer_dir is not None:
            from data_pipeline.tokenizer import tokenizer_sha256

            tok_sha = tokenizer_sha256(self.tokenizer_dir)
        check_compatible(manifest, self.model_config.vocab_size, self.seq_len, tok_sha, where=str(prepared))
        self.val_rows = TokenRows(prepared, "val", verify=verify) if manifest["splits"]["val"]["rows"] else None
        for rows in (self.rows, self.val_rows):  # before step 1: an id past the embedding is a crash on a GPU
            if rows is not None:
                check_token_range(rows, self.model_config.vocab_size)
        self.data_identity = {"fingerprint": manifest["fingerprint"], "tokenizer_sha256": tok_sha,
                              "prepared": str(prepared), "inputs": manifest.get("inputs")}
        if self.state is not None:
            saved = self.state.get("data")
            changes = None
            if saved and saved.get("inputs") and manifest.get("inputs"):
                from data_pipeline.prepare import input_changes

                changes = input_changes(saved["inputs"], manifest["inputs"])
            check_data(self.resume, saved, manifest["fingerprint"], tok_sha, changes)
            tokenizer_ids = model_changes(self.saved_model, self.model_config.to_dict(), with_tokenizer_ids=True)
            if tokenizer_ids:
                raise CheckpointError(f"cannot resume {self.resume}: {diff_lines(tokenizer_ids)} (from the tokenizer); "
                                      "the weights were trained with the old ids; start a new run")
        self.total_steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * len(self.rows) / self.global_batch))

    def _setup_model_and_resume(self) -> None:
        config, info = self.config, self.info
        state = self.state
        load_universal = False
        if state is not None:
            load_universal = (state["world_size"] != info.world_size and config.train.backend == "deepspeed"
                              and config.train.zero_stage > 0)
            if load_universal and info.is_main:
                convert_to_universal(self.resume / "backend")
            _barrier()
        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        self.model = TransformerLM(self.model_config)
        self.backend = make_backend(self.model, config, info, self.accumulation, load_universal)
        self.stream = TokenStream(self.rows, self.micro, info.rank, info.world_size, seed=config.train.seed,
                                  prefetch=config.data.prefetch, pin_memory=info.device.type == "cuda")
        self.step, self.tokens_seen, self.last_saved = 0, 0, -1
        self.skipped_steps, self.consecutive_skips = 0, 0
        self.faults = faults.active()
        if state is not None:
            self.backend.load(self.resume / "backend", state["world_size"])
            self.stream.load_state_dict(state["stream"])
            self.step, self.tokens_seen, self.last_saved = state["step"], state.get("tokens_seen", 0), state["step"]
            self.skipped_steps = state.get("skipped_steps", 0)
            if not load_rng(self.resume, info.rank):
                torch.manual_seed(config.train.seed + self.step)
            log.info("resumed from %s at step %d (%d samples consumed)", self.resume, self.step,
                     self.stream.consumed_samples)

    def _setup_logging(self) -> None:
        config, info = self.config, self.info
        if info.is_main and info.device.type == "cpu" and config.train.precision == "bf16" \
                and "AVX512" not in torch.backends.cpu.get_cpu_capability():
            log.warning("this CPU (%s) has no AVX-512 BF16: bf16 matmuls are emulated and can be 10-45x slower than "
                        "fp32; consider --train.precision=fp32", torch.backends.cpu.get_cpu_capability())
        self.flops = flops_per_token(self.model_config, self.seq_len)
        self.peak = peak_flops(torch.cuda.get_device_name(info.device)) if info.device.type == "cuda" else None
        self.history: list[dict[str, Any]] = []
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl") if info.is_main else None
        self.wandb = WandbLogger(config.logging.wandb, config.logging.wandb_project, config.name, config.to_dict(),
                                 self.run_dir) if info.is_main else None
        if self.changes:
            self.record({"step": self.step, "config_change": {k: list(v) for k, v in self.changes.items()}})
            if info.is_main:
                self.wandb.update_config({"config_changes": self.change_log})
        self.interactive = info.is_main and config.logging.progress and sys.stderr.isatty()
        self.bar = progress_bar(self.total_steps, self.step, self.interactive)
        self.last_eval: dict[str, float] = {}
        if info.is_main:
            log.info("training %s: %s parameters, %d steps of %d sequences x %d tokens (%d ranks x micro %d x "
                     "accumulation %d), backend %s%s, %s", config.name, f"{self.model.num_parameters():,}",
                     self.total_steps, self.global_batch, self.seq_len, info.world_size, self.micro, self.accumulation,
                     config.train.backend, f" ZeRO-{config.train.zero_stage}" if config.train.backend == "deepspeed" else "",
                     config.train.precision)

    # --- pieces of the loop ------------------------------------------------------------------------

    def record(self, values: dict[str, Any]) -> None:
        if self.info.is_main:
            self.metrics.write(values)
            self.wandb.log({k: v for k, v in values.items() if k != "step"}, step=values["step"])
        self.history.append(values)

    def run_eval(self, final: bool = False) -> None:
        if self.val_rows is None:
            return
        max_batches = None if final and self.config.eval.final_full else self.config.eval.max_batches
        self.last_eval = evaluate(self.backend, self.val_rows, self.config.eval.batch_size or self.micro,
                                  max_batches, self.info)
        self.record({"step": self.step, **self.last_eval, "tokens_seen": self.tokens_seen})
        if self.info.is_main and not self.interactive:
            log.info("step %d: val loss %.4f, perplexity %.2f", self.step, self.last_eval["val_loss"],
                     self.last_eval["val_ppl"])

    def checkpoint(self) -> Path:
        path = save_checkpoint(self.run_dir, self.step, self.backend, self.stream, self.config, self.model_config,
                               self.tokenizer_dir, self.info,
                               {"tokens_seen": self.tokens_seen, "total_steps": self.total_steps,
                                "skipped_steps": self.skipped_steps, "data": self.data_identity,
                                "config_changes": self.change_log, **self.last_eval})
        self.last_saved = self.step
        return path

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """One optimizer step; returns (local loss sum, global target tokens, lr, grad norm)."""
        info = self.info
        lr = lr_at(self.step, self.total_steps, self.config.optim.lr, self.config.schedule)
        self.backend.set_lr(lr)
        if faults.hit(self.faults, "kill", self.step + 1, info.rank):
            faults.kill_self(f"as step {self.step + 1} begins")
        batches = [next(self.stream) for _ in range(self.accumulation)]
        if self.packed:  # every target counts: a constant, made once (no host-to-device copy per step)
            if not hasattr(self, "_packed_tokens"):
                self._packed_tokens = torch.tensor(float(self.global_batch * self.seq_len), dtype=torch.float64,
                                                   device=info.device)
            tokens = self._packed_tokens
            scale = info.world_size / (self.global_batch * self.seq_len)
        else:
            tokens = _all_reduce(torch.tensor(float(sum(b["loss_mask"].sum() for b in batches)), dtype=torch.float64,
                                              device=info.device))
            scale = info.world_size / tokens.item()
        if faults.hit(self.faults, "nan", self.step + 1, info.rank):
            scale = float("nan")  # the gradients of this step (not the loss) become NaN
        loss = torch.zeros((), dtype=torch.float64, device=info.device)
        for i, batch in enumerate(batches):
            loss += self.backend.micro_step(batch, scale, last=i == self.accumulation - 1).double()
        grad_norm = self.backend.optimizer_step()
        self.step += 1
        self.tokens_seen += self.global_batch * self.seq_len
        self.bar.update(1)
        if self.backend.skipped:
            self._non_finite(loss, tokens, lr, grad_norm)
        else:
            self.consecutive_skips = 0
        return loss, tokens, lr, grad_norm

    def _non_finite(self, loss: torch.Tensor, tokens: torch.Tensor, lr: float, grad_norm: torch.Tensor | None) -> None:
        """A step whose gradients were not finite (its update was not applied): count it, or stop."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        policy, limit = self.config.train.nan_policy, self.config.train.max_skipped_steps
        norm = None if grad_norm is None else float(grad_norm)
        if self.info.is_main:
            log.warning("step %d: non-finite gradients (norm %s): the update was skipped (%d skipped so far)",
                        self.step, norm, self.skipped_steps)
        self.record({"step": self.step, "skipped_step": True, "skipped_steps": self.skipped_steps, "grad_norm": norm})
        if policy == "skip" and self.consecutive_skips <= limit:
            return
        why = "train.nan_policy is stop" if policy == "stop" else f"{self.consecutive_skips} steps in a row were skipped"
        last = find_resume(self.run_dir, "auto")
        dump = self.run_dir / f"nonfinite-step-{self.step:08d}.json"
        if self.info.is_main:
            atomic_write_json(dump, {
                "step": self.step, "why": why, "lr": lr, "grad_norm": norm,
                "step_loss": float(loss / tokens * self.info.world_size), "skipped_steps": self.skipped_steps,
                "parameters_with_nonfinite_grads": self.backend.nonfinite,
                "data_position": {"consumed_samples": self.stream.consumed_samples, "epoch": self.stream.epoch},
                "last_good_checkpoint": str(last) if last else None, "config": self.config.to_dict(),
            })
        raise TrainingError(f"non-finite gradients at step {self.step} ({why}): wrote {dump}; nothing was saved "
                            f"from this state; the last good checkpoint is {last or 'none (no checkpoint yet)'}")

    def log_window(self, loss: torch.Tensor, tokens: torch.Tensor, steps: int, seconds: float, lr: float,
                   grad_norm: torch.Tensor | None) -> None:
        sums = _all_reduce(torch.stack([loss, tokens / self.info.world_size]))
        tokens_per_s = steps * self.global_batch * self.seq_len / seconds
        values = {"step": self.step, "loss": (sums[0] / sums[1]).item(), "lr": lr,
                  "grad_norm": None if grad_norm is None else float(grad_norm), "tokens_seen": self.tokens_seen,
                  "tokens_per_s": tokens_per_s, "step_time": seconds / steps, "epoch": self.stream.epoch,
                  "skipped_steps": self.skipped_steps}
        if self.peak is not None:
            values["mfu"] = self.flops * tokens_per_s / self.info.world_size / self.peak
        self.record(values)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        if self.info.is_main and not self.interactive:
            log.info("step %d/%d: loss %.4f, lr %.2e, %s tokens/s", self.step, self.total_steps, values["loss"], lr,
                     f"{tokens_per_s:,.0f}")

    # --- the run ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the end (or to train.stop_at, or until asked to stop), then evaluate and checkpoint."""
        info = self.info
        stop = StopRequest(self.config.train.stop_grace_s).install()  # until the final checkpoint is written, a stop signal only sets a flag
        try:
            stopped = self._loop(stop)
            if self.state is not None and self.step == self.state["step"]:
                if info.is_main:
                    log.info("%s is already at step %d; nothing to train", self.run_dir, self.step)
                self.last_eval = {k: self.state[k] for k in ("val_loss", "val_ppl", "val_tokens", "val_loss_se")
                                  if k in self.state}
                final_path = self.resume
            else:
                if self.step == self.total_steps and not stopped:
                    self.run_eval(final=True)
                final_path = self.checkpoint() if self.last_saved != self.step else checkpoint_dir(self.run_dir, self.step)
            return self._summary(final_path, stopped)
        finally:
            stop.uninstall()
            self.bar.close()
            self.stream.close()
            if info.is_main:
                self.metrics.close()
                self.wandb.finish()
            engine = getattr(self.backend, "engine", None)
            if engine is not None and hasattr(engine, "destroy"):
                engine.destroy()
            self.release()

    def _loop(self, stop: StopRequest) -> str | None:
        config = self.config
        stop_at = min(self.total_steps, config.train.stop_at or self.total_steps)
        if config.eval.at_start and self.step == 0:
            self.run_eval()
        window_loss = torch.zeros((), dtype=torch.float64, device=self.info.device)
        window_tokens = torch.zeros((), dtype=torch.float64, device=self.info.device)
        window_start, window_steps = time.perf_counter(), 0
        while self.step < stop_at:
            loss, tokens, lr, grad_norm = self.train_step()
            window_loss += loss
            window_tokens += tokens
            window_steps += 1
            if self.step % config.logging.log_every == 0 or self.step == self.total_steps:
                self.log_window(window_loss, window_tokens, window_steps, time.perf_counter() - window_start, lr, grad_norm)
                window_loss.zero_()
                window_tokens.zero_()
                window_start, window_steps = time.perf_counter(), 0
            if config.eval.every and self.step % config.eval.every == 0 and self.step < self.total_steps:
                self.run_eval()
            if config.checkpoint.every and self.step % config.checkpoint.every == 0 and self.step < self.total_steps:
                self.checkpoint()
            stopped = stop.agreed()
            if stopped:
                if self.info.is_main and stopped != INTERRUPTED:  # Ctrl-C gets one line from the CLI, at the end
                    log.warning("stopping at step %d (%s); rerun the same command to resume", self.step, stopped)
                return stopped
        return None

    def _summary(self, final_path: Path, stopped: str | None) -> dict[str, Any]:
        info = self.info
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir), "steps": self.step, "total_steps": self.total_steps,
            "complete": self.step == self.total_steps, "tokens_seen": self.tokens_seen, "world_size": info.world_size,
            "skipped_steps": self.skipped_steps,
            "stopped": stopped, "backend": self.config.train.backend, "checkpoint": str(final_path),
            "model": str(final_path / "model"), "num_parameters": self.model.num_parameters(),
            "flops_per_token": self.flops, "config_changes": self.change_log, **self.last_eval,
            "wall_seconds": round(time.perf_counter() - self.started, 1), "threads": torch.get_num_threads(),
            "cpu_seconds": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
        }
        logged = [h for h in self.history if "loss" in h]
        if logged:
            summary["final_loss"] = logged[-1]["loss"]
            summary["tokens_per_s"] = logged[-1]["tokens_per_s"]
            if self.peak is not None:
                summary["mfu"] = self.flops * logged[-1]["tokens_per_s"] / info.world_size / self.peak
        summary["peak_memory_mb"] = (torch.cuda.max_memory_allocated(info.device) / 2**20 if info.device.type == "cuda"
                                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if info.is_main and self.config.logging.sample_prompt:
            summary["sample"] = _sample(final_path / "model", self.config.logging.sample_prompt, info.device)
        if info.is_main:
            atomic_write_json(self.run_dir / "summary.json", summary)
        return {**summary, "history": self.history}


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training described by `config`; returns its summary and logged history."""
    return Trainer(config).run()


def shutdown() -> None:
    """End the process group cleanly (without it, gloo runs sometimes abort at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
