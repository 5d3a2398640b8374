"""The training loop of one run: every rank runs it, as one plain process or under a launcher (torchrun,
deepspeed, srun); rank 0 writes the metrics, the consolidated model and the pointers.

The Trainer coordinates parts it is handed or builds with one call each: the run folder's lock, the data
(`tlm.training.data.load_run_data`), the backend (`make_backend`, with its own resume rules), the data stream,
the checkpointer (`tlm.checkpointing.checkpoints.Checkpointer`: backend, stream, counters, RNG) and the logger
(`tlm.training.metrics.RunLogger`). What stays here is the loop.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import tlm
from tlm_base.errors import CheckpointError, RankAgreedError, TLMError, TrainingError
from tlm_base.fileio import atomic_write_json
from tlm_base.locks import FolderLock
from data_pipeline.stream import TokenStream
from tlm.checkpointing.checkpoints import Checkpointer
from tlm.checkpointing.layout import ValidationFigures, checkpoint_dir, read_trainer_state
from tlm.checkpointing.lineage import find_resume, plan_start
from tlm.checkpointing.model_dir import read_model_meta, save_model_dir
from tlm.training.curves import refresh_run_figure
from tlm.training.resume_check import check_config, check_data, diff_lines, model_changes
from tlm.model.transformer import TransformerLM
from tlm_base import faults
from tlm.training.backends import check_resume, make_backend, prepare_resume
from tlm.training.distributed import all_reduce, barrier, from_rank0, init_distributed, set_collective_timeout
from tlm.training.config import TrainConfig
from tlm.training.data import load_run_data
from tlm.training.evaluate import evaluate, evaluate_parts
from tlm.model.flops import flops_per_token, peak_flops
from tlm.training.metrics import RunLogger
from tlm.training.optim import lr_at
from tlm.training.plan import check_memory
from tlm.training.preemption import INTERRUPTED, StopRequest
from tlm.training.session import Progress, eta_line, rerun_hint, run_summary

log = logging.getLogger("tlm")
HEARTBEAT_S = 60.0
STOP_AT = "stop_at"  # how a run that reached --train.stop_at says it stopped (summary.json's "stopped")


class Trainer:
    """One run: own the run folder, check a resume's config, then set up its parts and `run()` the loop."""

    def __init__(self, config: TrainConfig) -> None:
        self.started = time.perf_counter()
        # this session's CPU time: the process's so far is subtracted, as `tlm ablate` trains many runs in one process
        self.cpu_started = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        self.config = config
        self.info = info = init_distributed(config)
        self.shape = config.batch_shape(info.world_size)
        self.run_dir = config.run_dir
        self.lock = self._own_run_dir()
        try:
            self._check_resume()
            self.data = load_run_data(config, info.is_main, self.state.get("data") if self.state else None)
            self._check_resumed_data()
            self.model_config = self.data.model_config
            check_memory(self.model_config, config, self.shape, self.info.device, self.info.is_main)
            self.total_steps = config.train.max_steps or max(
                1, math.ceil(config.train.epochs * len(self.data.rows) / self.shape.global_batch_size))
            self._build()
            self._start_logging()
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
        config = self.config
        self.start, error = None, None
        if self.info.is_main:  # rank 0 reads the folder's lineage and decides; the others follow its answer
            try:
                self.start = plan_start(self.run_dir, config.checkpoint.resume, config.checkpoint.overwrite)
            except TLMError as e:
                error = str(e)
        error, resume = from_rank0((error, self.start.resume if self.start else None))
        if error:
            raise RankAgreedError(error)
        self.resume = resume
        self.state = state = read_trainer_state(self.resume) if self.resume is not None else None
        self.change_log: list[dict[str, Any]] = list(state.get("config_changes", [])) if state else []
        self.changes: dict[str, tuple[Any, Any]] = {}
        if state is None:
            return
        check_resume(self.resume, state, config)
        self.saved_model = state.get("model") or read_model_meta(self.resume / "model")["model"]
        self.changes = check_config(self.resume, state["config"], config.to_dict(), self.saved_model,
                                    config.model.to_dict(), config.checkpoint.allow_change)
        if self.changes:
            self.change_log.append({"step": state["step"], "changes": {k: list(v) for k, v in self.changes.items()}})
            if self.info.is_main:
                log.warning("resuming with changed settings (allowed): %s", diff_lines(self.changes))

    def _check_resumed_data(self) -> None:
        """A resumed run's data and tokenizer must be those its checkpoint was trained on (by content)."""
        if self.state is None:
            return
        saved, identity = self.state.get("data"), self.data.identity
        changes = None
        if saved and saved.get("inputs") and identity.get("inputs"):
            if "mix" in saved["inputs"] or "mix" in identity["inputs"]:
                from data_pipeline.mixture import mix_changes

                changes = mix_changes(saved["inputs"].get("mix", []), identity["inputs"].get("mix", []))
            else:
                from data_pipeline.prepare_config import input_changes

                changes = input_changes(saved["inputs"], identity["inputs"])
        check_data(self.resume, saved, identity["fingerprint"], identity["tokenizer_sha256"], changes)
        tokenizer_ids = model_changes(self.saved_model, self.data.model_config.to_dict(), with_tokenizer_ids=True)
        if tokenizer_ids:
            raise CheckpointError(f"cannot resume {self.resume}: {diff_lines(tokenizer_ids)} (from the tokenizer); "
                                  "the weights were trained with the old ids; start a new run")

    def _build(self) -> None:
        """Model, backend, stream and checkpointer; then, when resuming, everything restored from the checkpoint."""
        config, info = self.config, self.info
        if info.is_main:  # every check has passed: a rollback's branch, an overwrite, take effect now
            self.start.apply()
        self.resume = from_rank0(self.start.final if info.is_main else None)
        barrier()
        universal = prepare_resume(self.resume, self.state, config, info) if self.state is not None else False
        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        self.model = TransformerLM(self.model_config)
        self.backend = make_backend(self.model, config, info, self.shape, universal)
        self.stream = TokenStream(self.data.rows, self.shape.micro_batch_size, info.rank, info.world_size, seed=config.train.seed,
                                  prefetch=config.data.prefetch, pin_memory=info.device.type == "cuda",
                                  documents=config.train.document_masking)
        self.progress = Progress(started=self.started)
        self.checkpointer = Checkpointer(self.run_dir, info.rank, info.world_size, self.backend,
                                         {"": self.progress, "stream": self.stream}, self._describe, self._write_model,
                                         config.checkpoint.keep_last, barrier, self._save_hook,
                                         self.start.lineage if info.is_main else None, rerun_hint(config))
        self.last_saved, self.consecutive_skips = -1, 0
        self.faults = faults.active()
        self.last_eval: dict[str, float] = {}
        if self.state is not None:
            if not self.checkpointer.restore(self.resume, self.state):
                torch.manual_seed(config.train.seed + self.progress.step)  # another world size: no RNG for this rank
            self.last_saved = self.progress.step
            log.info("resumed from %s at step %d (%d samples consumed)", self.resume, self.progress.step,
                     self.stream.consumed_samples)

    def _start_logging(self) -> None:
        config, info = self.config, self.info
        if info.is_main and info.device.type == "cpu" and config.train.precision == "bf16" \
                and "AVX512" not in torch.backends.cpu.get_cpu_capability():
            log.warning("this CPU (%s) has no AVX-512 BF16: bf16 matmuls are emulated and can be 10-45x slower than "
                        "fp32; consider --train.precision=fp32", torch.backends.cpu.get_cpu_capability())
        self.flops = flops_per_token(self.model_config, self.shape.seq_len)
        self.peak = peak_flops(torch.cuda.get_device_name(info.device)) if info.device.type == "cuda" else None
        self.logger = RunLogger(config.to_dict(), config.name, self.run_dir, info.is_main, config.logging.wandb,
                                config.logging.wandb_project, config.logging.progress)
        if info.is_main:  # where this session stands in the folder's lineage (a rollback repeats steps)
            lineage = self.checkpointer.lineage
            self.logger.metrics.write({"step": self.step, "session": {
                "run_id": lineage["run_id"], "resumed_from": lineage["parent_name"],
                "abandoned": [p.name for p in self.start.abandon]}})
        if self.changes:
            self.logger.record({"step": self.step, "config_change": {k: list(v) for k, v in self.changes.items()}})
            if info.is_main:
                self.logger.wandb.update_config({"config_changes": self.change_log})
        if info.is_main and "CROSS_RANK" in os.environ and config.train.backend != "deepspeed":
            log.warning("launched by deepspeed, but train.backend is %s: no ZeRO; --train.backend=deepspeed for it",
                        config.train.backend)
        if info.is_main:
            backend = self.backend_name
            ranks = f"{info.world_size} rank{'s' if info.world_size > 1 else ''}"
            log.info("training %s: %s parameters, %d steps of %d sequences x %d tokens (%s x micro %d x "
                     "accumulation %d), backend %s%s, %s", config.name, f"{self.model.num_parameters():,}",
                     self.total_steps, self.shape.global_batch_size, self.shape.seq_len, ranks,
                     self.shape.micro_batch_size, self.shape.accumulation_steps,
                     backend, f" ZeRO-{config.train.zero_stage}" if backend == "deepspeed" else "",
                     config.train.precision)
        self.logger.start_progress(self.total_steps, self.step)
        self.trained_tokens, self.trained_seconds = 0, 0.0  # this session's, for the average rate
        self.first_step, self.last_line = self.step, time.perf_counter()

    # --- what a checkpoint holds ----------------------------------------------------------------------

    @property
    def backend_name(self) -> str:
        """The backend as it runs: `single` on several ranks is DDP."""
        backend = self.config.train.backend
        return "ddp" if backend == "single" and self.info.world_size > 1 else backend

    @property
    def step(self) -> int:
        return self.progress.step

    def _describe(self) -> dict[str, Any]:
        config = self.config
        return {"backend": config.train.backend, "zero_stage": config.train.zero_stage, "config": config.to_dict(),
                "model": self.model_config.to_dict(), "tlm_version": tlm.__version__, "total_steps": self.total_steps,
                "data": self.data.identity, "config_changes": self.change_log, **self.last_eval}

    def _write_model(self, state: dict[str, Any], path: Path, step: int) -> None:
        with torch.device("meta"):
            model = TransformerLM(self.model_config)
        model.load_state_dict(state, assign=True, strict=False)
        if self.model_config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        save_model_dir(model, path, tokenizer_dir=self.data.tokenizer_dir,
                       extra={"trained_steps": step, "trained_seq_len": self.shape.seq_len})

    def _save_hook(self, step: int) -> None:
        if faults.hit(self.faults, "kill_in_save", step, self.info.rank):
            faults.kill_self(f"while writing the checkpoint of step {step}")
        if faults.hit(self.faults, "stall_in_save", step, self.info.rank):
            time.sleep(60)

    # --- pieces of the loop ------------------------------------------------------------------------

    def record(self, values: dict[str, Any]) -> None:
        self.logger.record(values)

    def run_eval(self, final: bool = False) -> None:
        if self.data.val_rows is None and not self.data.val_sets:
            return
        max_batches = None if final and self.config.eval.final_full else self.config.eval.max_batches
        batch = self.config.eval.batch_size or self.shape.micro_batch_size
        documents = self.config.train.document_masking  # evaluated as trained
        if self.data.val_sets:  # a mixture: each part's validation split, then all of them together
            self.last_eval = evaluate_parts({name: evaluate(self.backend, rows, batch, max_batches, self.info,
                                                            token_bytes=self.data.token_bytes, documents=documents)
                                             for name, rows in self.data.val_sets.items()})
        else:
            periodic = self.config.eval.max_batches if max_batches is None else None
            self.last_eval = evaluate(self.backend, self.data.val_rows, batch, max_batches, self.info,
                                      token_bytes=self.data.token_bytes, documents=documents, periodic_batches=periodic)
        self.record({"step": self.step, **self.last_eval, "tokens_seen": self.progress.tokens_seen})
        if self.info.is_main and self.config.logging.curves and not final:  # the end of the run draws the last
            refresh_run_figure(self.run_dir)
        bpb = f", {self.last_eval['val_bpb']:.4f} bits/byte" if "val_bpb" in self.last_eval else ""
        whole = " (the whole split: eval.final_full)" if max_batches is None and self.config.eval.max_batches else ""
        self.logger.say(f"step {self.step}: val loss {self.last_eval['val_loss']:.4f}, perplexity "
                        f"{self.last_eval['val_ppl']:.2f}{bpb} over {self.last_eval['val_tokens']:,} tokens{whole}")

    def checkpoint(self) -> Path:
        path = self.checkpointer.save(self.step)
        self.last_saved = self.step
        return path

    def train_step(self) -> tuple[torch.Tensor, int, float, torch.Tensor | None]:
        """One optimizer step, the whole path of its batches: the step's target tokens over every rank (the one
        normaliser: the loss is their mean), a micro-step per batch (forward, loss sum x scale, backward) and
        the optimizer step. Returns (this rank's loss sum, its target tokens, lr, grad norm)."""
        info, shape = self.info, self.shape
        lr = lr_at(self.step, self.total_steps, self.config.optim.lr, self.config.schedule)
        self.backend.set_lr(lr)
        if self.faults:  # fault injection ($TLM_FAULT, the reliability tests); an empty dict in a real run
            faults.at_step_start(self.faults, self.step + 1, info.rank)
        batches = [next(self.stream) for _ in range(shape.accumulation_steps)]
        # x world size: every backend averages gradients over the ranks
        scale = info.world_size / self._step_tokens(batches)
        if self.faults and faults.hit(self.faults, "nan", self.step + 1, info.rank):
            scale = float("nan")  # the gradients of this step (not the loss) become NaN
        loss, tokens = torch.zeros((), dtype=torch.float64, device=info.device), 0
        for i, batch in enumerate(batches):
            loss_sum, batch_tokens = self.backend.micro_step(batch, scale, last=i == len(batches) - 1)
            loss += loss_sum.double()
            tokens += batch_tokens
        grad_norm = self.backend.optimizer_step()
        self.progress.step += 1
        self.progress.tokens_seen += shape.tokens_per_step
        self.trained_tokens += shape.tokens_per_step
        if self.backend.skipped:
            self._non_finite(loss, tokens, lr, grad_norm)
        else:
            self.consecutive_skips = 0
        return loss, tokens, lr, grad_norm

    def _step_tokens(self, batches: list[dict[str, torch.Tensor]]) -> int | float:
        """The target tokens of a step over every rank: all of them with packed rows (no communication), else the
        masked-in ones summed across the ranks (one small all-reduce, read back: a host sync)."""
        if self.data.packed:
            return self.shape.tokens_per_step
        local = torch.tensor(float(sum(b["loss_mask"].sum() for b in batches)), dtype=torch.float64,
                             device=self.info.device)
        return all_reduce(local).item()

    def _non_finite(self, loss: torch.Tensor, tokens: int, lr: float, grad_norm: torch.Tensor | None) -> None:
        """A step whose gradients were not finite (its update was not applied): count it, or stop."""
        self.progress.skipped_steps += 1
        self.consecutive_skips += 1
        policy, limit = self.config.train.nan_policy, self.config.train.max_skipped_steps
        norm = None if grad_norm is None else float(grad_norm)
        if self.info.is_main:
            log.warning("step %d: non-finite gradients (norm %s): the update was skipped (%d skipped so far)",
                        self.step, norm, self.progress.skipped_steps)
        self.record({"step": self.step, "skipped_step": True, "skipped_steps": self.progress.skipped_steps, "grad_norm": norm})
        if policy == "skip" and self.consecutive_skips <= limit:
            return
        why = "train.nan_policy is stop" if policy == "stop" else f"{self.consecutive_skips} steps in a row were skipped"
        last = find_resume(self.run_dir, "auto")
        dump = self.run_dir / f"nonfinite-step-{self.step:08d}.json"
        if self.info.is_main:
            atomic_write_json(dump, {
                "step": self.step, "why": why, "lr": lr, "grad_norm": norm,
                "rank0_step_loss": float(loss / tokens), "skipped_steps": self.progress.skipped_steps,
                "parameters_with_nonfinite_grads": self.backend.nonfinite,
                "data_position": {"consumed_samples": self.stream.consumed_samples, "epoch": self.stream.epoch},
                "last_good_checkpoint": str(last) if last else None, "config": self.config.to_dict(),
            })
        raise TrainingError(f"non-finite gradients at step {self.step} ({why}): wrote {dump}; nothing was saved "
                            f"from this state; the last good checkpoint is {last or 'none (no checkpoint yet)'}")

    def log_window(self, loss: torch.Tensor, tokens: int, steps: int, seconds: float, lr: float,
                   grad_norm: torch.Tensor | None) -> None:
        """The window's mean loss over every rank's target tokens (one all-reduce), its speed, and where it stands."""
        sums = all_reduce(torch.stack([loss, torch.tensor(float(tokens), dtype=torch.float64, device=loss.device)]))
        tokens_per_s = steps * self.shape.tokens_per_step / seconds
        values = {"step": self.step, "loss": (sums[0] / sums[1]).item(), "lr": lr,
                  "grad_norm": None if grad_norm is None else float(grad_norm), "tokens_seen": self.progress.tokens_seen,
                  "tokens_per_s": tokens_per_s, "step_time": seconds / steps, "epoch": self.stream.epoch,
                  "skipped_steps": self.progress.skipped_steps}
        if self.peak is not None:
            values["mfu"] = self.flops * tokens_per_s / self.info.world_size / self.peak
        self.record(values)
        self.trained_seconds += seconds
        self.logger.update(steps, loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if self.info.is_main and not self.logger.interactive:
            log.info("step %d/%d: loss %.4f, lr %.2e, %s tokens/s (%s)", self.step, self.total_steps, values["loss"], lr,
                     f"{tokens_per_s:,.0f}", self._eta())
            self.last_line = time.perf_counter()

    def _eta(self) -> str:
        return eta_line(self.step, self.total_steps, self.first_step, self.trained_seconds, self.progress.elapsed())

    def _heartbeat(self) -> None:
        """Without a terminal, a line at least every HEARTBEAT_S seconds, however far apart the log steps are."""
        if self.info.is_main and not self.logger.interactive and time.perf_counter() - self.last_line >= HEARTBEAT_S:
            log.info("step %d/%d (%s)", self.step, self.total_steps, self._eta())
            self.last_line = time.perf_counter()

    # --- the run ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the end (or to train.stop_at, or until asked to stop), then evaluate and checkpoint."""
        info = self.info
        stop = StopRequest(self.config.train.stop_grace_s, rerun_hint(self.config)).install()  # until the final checkpoint is written, a stop signal only sets a flag
        set_collective_timeout(self.config.train.collective_timeout_s, stop.group)
        try:
            stopped = self._loop(stop)
            if self.state is not None and self.step == self.state["step"]:
                if info.is_main:
                    log.info("%s is already at step %d; nothing to train", self.run_dir, self.step)
                self.last_eval = {k: self.state[k] for k in ValidationFigures.model_fields if k in self.state}
                final_path = self.resume
            else:
                if self.step == self.total_steps and not stopped:
                    self.run_eval(final=True)
                final_path = self.checkpoint() if self.last_saved != self.step else checkpoint_dir(self.run_dir, self.step)
            if info.is_main and self.config.logging.curves:
                refresh_run_figure(self.run_dir)
            return run_summary(self, final_path, stopped)
        finally:
            stop.uninstall()
            self.logger.close()
            self.stream.close()
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
        window_tokens = 0
        window_start, window_steps = time.perf_counter(), 0
        while self.step < stop_at:
            loss, tokens, lr, grad_norm = self.train_step()
            window_loss += loss
            window_tokens += tokens
            window_steps += 1
            if self.step % config.logging.log_every == 0 or self.step == self.total_steps:
                self.log_window(window_loss, window_tokens, window_steps, time.perf_counter() - window_start, lr, grad_norm)
                window_loss.zero_()
                window_tokens = 0
                window_start, window_steps = time.perf_counter(), 0
            self._heartbeat()
            if config.eval.every and self.step % config.eval.every == 0 and self.step < self.total_steps:
                self.run_eval()
            if config.checkpoint.every and self.step % config.checkpoint.every == 0 and self.step < self.total_steps:
                self.checkpoint()
            stopped = stop.agreed()
            if stopped:
                if self.info.is_main and stopped != INTERRUPTED:  # Ctrl-C gets one line from the CLI, at the end
                    log.warning("stopping at step %d (%s); %s", self.step, stopped, rerun_hint(config))
                return stopped
        if self.step < self.total_steps:
            if self.info.is_main:
                log.warning("stopped at --train.stop_at=%d (step %d of %d); %s", stop_at, self.step, self.total_steps,
                            rerun_hint(config, at_stop_at=True))
            return STOP_AT
        return None

def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training described by `config`; returns its summary and logged history."""
    return Trainer(config).run()


def shutdown() -> None:
    """End the process group cleanly (without it, gloo runs sometimes abort at exit)."""
    if dist.is_initialized():
        dist.barrier()
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            ds_comm.destroy_process_group()  # also drops DeepSpeed's cached groups: a later run in this process
        else:                               # would meet the destroyed ones ("Group ... is not registered")
            dist.destroy_process_group()
