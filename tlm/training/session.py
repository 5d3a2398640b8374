"""What a run says about itself: how to resume it (every message that says so names a command that does), how far
along it is, the sample and the figures printed at its end (`run_summary`, also RUN/summary.json), and the
counters its checkpoints carry (`Progress`)."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tlm.training.config import TrainConfig
from tlm_base.fileio import atomic_write_json


def sample_text(model_dir: Path, prompt: str, device: torch.device) -> str | None:
    """`prompt` and 48 sampled tokens from the model folder (None when it has no tokenizer): the run's last line."""
    from data_pipeline.tokenizer_files import has_tokenizer, load_tokenizer
    from tlm.checkpointing.model_dir import load_model_dir
    from tlm.model.generate import generate

    if not has_tokenizer(model_dir):
        return None
    model = load_model_dir(model_dir, device=device)
    tok = load_tokenizer(model_dir)
    ids = generate(model, [tok.encode(prompt).ids], max_new_tokens=48, temperature=0.8, top_k=50,
                   eos_token_id=model.config.eos_token_id, generator=torch.Generator(device=device).manual_seed(0))[0]
    return prompt + tok.decode(ids)


def rerun_hint(config: TrainConfig, at_stop_at: bool = False) -> str:
    """How to resume this run, for every message that says so: the same command only when it would continue
    (not with --checkpoint.resume=none or a rollback's path, nor after reaching --train.stop_at)."""
    changes, again = [], ""
    resume = config.checkpoint.resume
    if resume != "auto":
        changes.append(f"--checkpoint.resume=auto in place of --checkpoint.resume={resume}")
        again = "start over" if resume == "none" else f"go back to {resume} again"
    if at_stop_at:
        changes.append(f"a later --train.stop_at than {config.train.stop_at} (or none)")
        again = again or "stop there again"
    if not changes:
        return "rerun the same command to resume"
    return f"rerun with {' and '.join(changes)} to resume (the same command would {again})"


@dataclass
class Progress:
    """The trainer's own counters: saved at the top level of trainer.json and restored from it. `wall_seconds` is
    the run's time over all its sessions (this one counted from `started`)."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    wall_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter, repr=False)

    def elapsed(self) -> float:
        """Seconds the run has taken so far: earlier sessions' and this one's."""
        return self.wall_seconds + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                "wall_seconds": round(self.elapsed(), 3)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = state["step"], state.get("tokens_seen", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.wall_seconds = state.get("wall_seconds", 0.0)  # an older checkpoint did not count it


def eta_line(step: int, total: int, first_step: int, session_seconds: float, elapsed: float) -> str:
    """`12.5%, 3m10s elapsed, ETA 22m05s` for a log without a terminal (the rate: this session's steps)."""
    done = step - first_step
    eta = f", ETA {clock(session_seconds / done * (total - step))}" if done > 0 and step < total else ""
    return f"{100 * step / total:.1f}%, {clock(elapsed)} elapsed{eta}"


def clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def run_summary(trainer: Any, final_path: Path, stopped: str | None) -> dict[str, Any]:
    """The run's figures as printed last and kept in RUN/summary.json (rank 0 writes it), with this session's
    logged history for in-process callers."""
    info = trainer.info
    summary: dict[str, Any] = {
        "run_dir": str(trainer.run_dir), "steps": trainer.step, "total_steps": trainer.total_steps,
        "complete": trainer.step == trainer.total_steps, "tokens_seen": trainer.progress.tokens_seen,
        "world_size": info.world_size, "skipped_steps": trainer.progress.skipped_steps,
        "stopped": stopped, "backend": trainer.backend_name, "checkpoint": str(final_path),
        "model": str(final_path / "model"), "num_parameters": trainer.model.num_parameters(),
        "flops_per_token": trainer.flops, "config_changes": trainer.change_log, **trainer.last_eval,
        "wall_seconds": round(trainer.progress.elapsed(), 1),
        "session_seconds": round(time.perf_counter() - trainer.started, 1), "threads": torch.get_num_threads(),
        "cpu_seconds": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - trainer.cpu_started, 1),
    }
    logged = [h for h in trainer.logger.history if "loss" in h]
    summary["losses"] = [h["loss"] for h in logged]  # this session's logged windows
    if logged:
        summary["final_loss"] = logged[-1]["loss"]
        # the run's average over this session's training steps (evaluation and checkpoints excluded); the last
        # window's rate separately, named so
        summary["tokens_per_s"] = trainer.trained_tokens / max(trainer.trained_seconds, 1e-9)
        summary["recent_tokens_per_s"] = logged[-1]["tokens_per_s"]
        if trainer.peak is not None:
            summary["mfu"] = trainer.flops * summary["tokens_per_s"] / info.world_size / trainer.peak
    summary["peak_memory_mb"] = (torch.cuda.max_memory_allocated(info.device) / 2**20 if info.device.type == "cuda"
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if info.is_main and trainer.config.logging.sample_prompt:
        summary["sample"] = sample_text(final_path / "model", trainer.config.logging.sample_prompt, info.device)
    if info.is_main:
        atomic_write_json(trainer.run_dir / "summary.json", summary)
    return {**summary, "history": trainer.logger.history}
