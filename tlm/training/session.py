"""What a run says about itself beside its figures: how to resume it (every message that says so names a command
that does), the sample printed at its end, and the counters its checkpoints carry (`Progress`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tlm.training.config import TrainConfig


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
