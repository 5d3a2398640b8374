"""AdamW parameter groups and the learning-rate schedules (stepped once per optimizer step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from tlm.training.sections import OptimSection, ScheduleSection


def param_groups(model: nn.Module, optim: OptimSection) -> list[dict]:
    """One group, or two when norms and embeddings are exempt from weight decay.

    Exempt: every 1-D parameter (norm weights) and the embedding matrix (tied to lm_head, it is one
    parameter and is exempt as a whole).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.decay_norms_and_embeddings:
        return [{"params": params, "weight_decay": optim.weight_decay}]
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for p in params if p.ndim >= 2 and id(p) not in embedding]
    keep = [p for p in params if p.ndim < 2 or id(p) in embedding]
    return [{"params": decay, "weight_decay": optim.weight_decay}, {"params": keep, "weight_decay": 0.0}]


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that makes no update when a gradient is not finite; `overflow` says whether it skipped (the
    attribute DeepSpeed's engine reads to count skipped steps) and `_global_grad_norm` holds the norm."""

    overflow = False
    _global_grad_norm = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        self._global_grad_norm = float(norm)
        self.overflow = not torch.isfinite(norm).item()
        if self.overflow:
            return None
        return super().step(closure)


def adamw(groups: list[dict], optim: OptimSection, fused: bool | None = None,
          skip_nonfinite: bool = False) -> torch.optim.AdamW:
    """torch's AdamW with the configured betas and eps (SkippingAdamW when asked to skip non-finite steps)."""
    kind = SkippingAdamW if skip_nonfinite else torch.optim.AdamW
    return kind(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused)


def lr_at(step: int, total_steps: int, lr: float, schedule: ScheduleSection) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    warmup = schedule.warmup_steps
    floor = lr * schedule.min_lr_ratio
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule.kind == "constant":
        return lr
    if schedule.kind == "cosine":
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))
    # wsd: warmup, stable at lr, then linear decay to the floor over the last decay_fraction of the run
    decay_steps = max(1, round(total_steps * schedule.decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return lr
    return lr - (lr - floor) * min(1.0, (step - decay_start + 1) / decay_steps)
