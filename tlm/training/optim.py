"""The optimizers (AdamW, or Muon with AdamW: tlm.training.muon), their parameter groups, and the learning-rate
schedules (stepped once per optimizer step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from tlm.training.muon import MuonAdamW, clip_or_skip
from tlm.training.sections import OptimSection, ScheduleSection


def param_groups(model: nn.Module, optim: OptimSection, exclude: set[int] | None = None) -> list[dict]:
    """One group, or two when norms and embeddings are exempt from weight decay; each says its `role` (decay or
    exempt), by which a resume re-applies the configured hyperparameters.

    Exempt: every 1-D parameter (norm weights) and the embedding matrix (tied to lm_head, it is one
    parameter and is exempt as a whole). Parameters whose id is in `exclude` are left out (Muon's).
    """
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in (exclude or set())]
    if optim.decay_norms_and_embeddings:
        return [{"params": params, "weight_decay": optim.weight_decay, "role": "decay"}]
    embedding = embedding_ids(model)
    decay = [p for p in params if p.ndim >= 2 and id(p) not in embedding]
    keep = [p for p in params if p.ndim < 2 or id(p) in embedding]
    return [{"params": decay, "weight_decay": optim.weight_decay, "role": "decay"},
            {"params": keep, "weight_decay": 0.0, "role": "exempt"}]


def embedding_ids(model: nn.Module) -> set[int]:
    """The ids of the embedding matrices (a tied lm_head is the same parameter)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights other than the embedding and the output head (tied or not): the matrices Muon is
    for (attention and MLP projections)."""
    heads = embedding_ids(model)
    head = getattr(model, "lm_head", None)
    if head is not None:
        heads.add(id(head.weight))
    return [p for p in model.parameters() if p.requires_grad and p.ndim == 2 and id(p) not in heads]


def build_optimizer(model: nn.Module, optim: OptimSection, fused: bool | None = None, clipping: bool = False,
                    skip_nonfinite: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer over `model`'s parameters: AdamW (`adamw`), or with optim.name muon a MuonAdamW: torch's
    Muon for the hidden matrices at optim.muon_lr, AdamW at optim.lr for the rest."""
    if optim.name != "muon":
        return adamw(param_groups(model, optim), optim, fused=fused, clipping=clipping, skip_nonfinite=skip_nonfinite)
    matrices = hidden_matrices(model)
    muon = [{"params": matrices, "role": "muon", **muon_hyperparameters(optim)}]
    rest = param_groups(model, optim, exclude={id(p) for p in matrices})
    return MuonAdamW(muon, rest, {"lr": optim.muon_lr}, adamw_kwargs(optim, fused),
                     max_norm=optim.grad_clip if clipping else 0.0, skip_nonfinite=clipping and skip_nonfinite)


def muon_hyperparameters(optim: OptimSection) -> dict:
    decay = optim.weight_decay if optim.muon_weight_decay is None else optim.muon_weight_decay
    return {"weight_decay": decay, "momentum": optim.muon_momentum, "nesterov": optim.muon_nesterov,
            "ns_steps": optim.muon_ns_steps, "adjust_lr_fn": optim.muon_adjust_lr_fn}


def lr_ratio(group: dict, optim: OptimSection) -> float:
    """A group's learning rate over the schedule's (optim.lr's): Muon's groups run at muon_lr."""
    return optim.muon_lr / optim.lr if group.get("optimizer") == "muon" else 1.0


def apply_hyperparameters(groups: list[dict], roles: list[str | None], optim: OptimSection) -> None:
    """Set each group's hyperparameters (but lr, which the schedule sets every step) from the config, by the role it
    had when built: a checkpoint's optimizer state brings its own, and a resume that changed them on purpose
    (--checkpoint.allow_change=optim.weight_decay, ...) would otherwise keep the old ones without a word."""
    for group, role in zip(groups, roles):
        if role == "muon":
            group.update(muon_hyperparameters(optim))
        elif role in ("decay", "exempt"):
            group.update(betas=tuple(optim.betas), eps=optim.eps,
                         weight_decay=optim.weight_decay if role == "decay" else 0.0)


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
        if clip_or_skip(self, self.max_norm, self.skip_nonfinite):
            return None
        return super().step(closure)


def adamw_kwargs(optim: OptimSection, fused: bool | None) -> dict:
    """torch's AdamW with the configured betas and eps: fused when asked, else for-each, one kernel (or DTensor
    dispatch, under FSDP2) per operation over all the parameters instead of one per parameter (torch picks for-each
    by itself only on CUDA; on CPU its per-parameter loop gives the same bits for more host time: docs/performance.md)."""
    return dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused, foreach=None if fused else True)


def adamw(groups: list[dict], optim: OptimSection, fused: bool | None = None, clipping: bool = False,
          skip_nonfinite: bool = False) -> torch.optim.AdamW:
    """torch's AdamW (adamw_kwargs). With `clipping`, a ClippingAdamW that clips to optim.grad_clip and, with
    `skip_nonfinite`, skips non-finite steps."""
    kwargs = adamw_kwargs(optim, fused)
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
