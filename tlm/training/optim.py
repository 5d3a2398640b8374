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


class ClippingAdamW(torch.optim.AdamW):
    """AdamW that clips the global gradient norm itself (torch's clip_grad_norm_, for-each) and, with `skip_nonfinite`,
    makes no update when that norm is not finite: DeepSpeed ZeRO-0 steps it directly, so that its step is the plain
    backend's (DeepSpeed's own ZeRO-0 clipping walks the parameters one by one in Python and all-reduces the norm,
    and a second norm was needed for the guard). `overflow` says whether it skipped (the attribute DeepSpeed's engine
    reads to count skipped steps; computing it is the guard's one host sync), `_global_grad_norm` holds the norm as
    a tensor (what the engine's get_global_grad_norm returns; read back only when logged)."""

    def __init__(self, params, max_norm: float = 0.0, skip_nonfinite: bool = False, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_norm, self.skip_nonfinite = max_norm, skip_nonfinite
        self.overflow, self._global_grad_norm = False, None

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_norm > 0 or self.skip_nonfinite:
            params = [p for group in self.param_groups for p in group["params"]]
            norm = nn.utils.clip_grad_norm_(params, self.max_norm if self.max_norm > 0 else math.inf)
            self._global_grad_norm = norm
            self.overflow = self.skip_nonfinite and not bool(torch.isfinite(norm))
            if self.overflow:
                return None
        return super().step(closure)


def adamw(groups: list[dict], optim: OptimSection, fused: bool | None = None, clipping: bool = False,
          skip_nonfinite: bool = False) -> torch.optim.AdamW:
    """torch's AdamW with the configured betas and eps: fused when asked, else for-each, one kernel (or DTensor
    dispatch, under FSDP2) per operation over all the parameters instead of one per parameter (torch picks for-each
    by itself only on CUDA; on CPU its per-parameter loop gives the same bits for more host time: docs/performance.md).
    With `clipping`, a ClippingAdamW that clips to optim.grad_clip and, with `skip_nonfinite`, skips non-finite steps."""
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused, foreach=None if fused else True)
    if clipping:
        return ClippingAdamW(groups, max_norm=optim.grad_clip, skip_nonfinite=skip_nonfinite, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


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
