"""Muon for the hidden weight matrices and AdamW for the rest, as one torch optimizer (one `param_groups`, one
`state_dict`), so that every backend steps, checkpoints and re-shards it as it does AdamW alone.

torch's Muon orthogonalises each matrix's Nesterov momentum with a Newton-Schulz iteration; it needs the whole
matrix. Under FSDP2 a parameter is a DTensor holding one shard of rows: the momentum is updated on the shard (it is
element-wise), the update is gathered, orthogonalised on every rank alike, and each rank applies its own rows, the
same arithmetic as on one process (torch's Muon on a DTensor would run the iteration on sharded operands, which
rounds otherwise: 1e-3 apart after one step in a trial). Every rank holds one whole matrix at a time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

MUON = "muon"
ADAMW = "adamw"


def clip_or_skip(optimizer: Any, max_norm: float, skip_nonfinite: bool) -> bool:
    """Clip the global gradient norm of the optimizer's parameters to `max_norm` (0 = no clipping) and keep it in
    `optimizer._global_grad_norm`; returns whether the step must be skipped (a non-finite norm, with `skip_nonfinite`),
    also kept in `optimizer.overflow` (what DeepSpeed's engine reads to count skipped steps). Neither asked: nothing
    is computed, and the step goes ahead."""
    if max_norm > 0 or skip_nonfinite:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        optimizer._global_grad_norm = norm
        optimizer.overflow = skip_nonfinite and not bool(torch.isfinite(norm))
    return optimizer.overflow


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon's update for the groups tagged `optimizer: muon`, torch.optim.AdamW for those tagged `adamw`;
    each group keeps its own lr and hyperparameters. With `max_norm` / `skip_nonfinite` it clips the global gradient
    norm first and skips a non-finite step (DeepSpeed ZeRO-0 steps it directly, as it does ClippingAdamW)."""

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], muon_kwargs: dict, adamw_kwargs: dict,
                 max_norm: float = 0.0, skip_nonfinite: bool = False) -> None:
        # the two torch optimizers fill in their groups' defaults; this one holds those very group dicts
        self._muon = torch.optim.Muon([{**g, "optimizer": MUON} for g in muon_groups], **muon_kwargs)
        self._adamw = torch.optim.AdamW([{**g, "optimizer": ADAMW} for g in adamw_groups], **adamw_kwargs)
        super().__init__(self._muon.param_groups + self._adamw.param_groups, {})
        self.max_norm, self.skip_nonfinite = max_norm, skip_nonfinite
        self.overflow, self._global_grad_norm = False, None
        # FSDP2's parameters are DTensors (known once: the step need not look again)
        self._gathered = any(isinstance(p, DTensor) for g in self._muon.param_groups for p in g["params"])
        self._link()

    def _link(self) -> None:
        """Point the two torch optimizers at this one's groups and state (again after a load replaced them)."""
        for inner, kind in ((self._muon, MUON), (self._adamw, ADAMW)):
            inner.param_groups = [g for g in self.param_groups if g["optimizer"] == kind]
            inner.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW takes no closure")
        if clip_or_skip(self, self.max_norm, self.skip_nonfinite):
            return None
        if self._gathered:
            self._gathered_muon_step()
        else:
            self._muon.step()
        self._adamw.step()

    def _gathered_muon_step(self) -> None:
        """torch's Muon step (torch.optim._muon._single_tensor_muon's arithmetic) for row-sharded DTensors: the
        update gathered whole, orthogonalised, and this rank's rows applied."""
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        for group in self._muon.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                whole = _zeropower_via_newtonschulz(update.full_tensor(), group["ns_coefficients"], group["ns_steps"],
                                                    group["eps"])
                shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
                rows = whole[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
                local = param.to_local()
                local.mul_(1 - lr * decay)
                local.add_(rows, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))

