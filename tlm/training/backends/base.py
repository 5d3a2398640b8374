"""The interface every backend offers the training loop: a micro-step (forward, loss, backward), an optimizer
step, its own checkpoint files, and the full fp32 state dict for the consolidated model folder."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from torch import nn

from tlm.model.transformer import TransformerLM
from tlm.training.config import TrainConfig
from tlm.training.distributed import DistInfo
from tlm.training.optim import apply_hyperparameters, lr_ratio


class Backend:
    """The interface the training loop uses."""

    name = "base"
    gathers_in_forward = False
    """Whether forward gathers sharded parameters with collectives (ZeRO-3, FSDP2): then every rank must run
    forwards of the same shapes in the same order (evaluation pads its batches so)."""

    def __init__(self, model: TransformerLM, config: TrainConfig, info: DistInfo) -> None:
        self.config = config
        self.info = info
        self.bf16 = config.train.precision == "bf16"
        fused = config.train.fused_adamw
        self.fused = (info.device.type == "cuda") if fused is None else fused
        self.check_finite = config.train.nan_policy != "off"
        self.skipped = False
        """Whether the last optimizer step was skipped for non-finite gradients."""
        self.nonfinite: list[str] = []
        """Parameters whose gradients were not finite at the last skipped step (where this rank can tell)."""

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=torch.bfloat16)

    def accumulation_context(self, last: bool):
        """Where gradients are not synchronised across ranks until the last micro-batch of a step."""
        return contextlib.nullcontext()

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 sum of the target tokens' cross-entropy, computed inside the model's forward (so that
        ZeRO-3 / FSDP2 gather the output projection) with the configured loss chunking."""
        with self.autocast():
            return self.model(batch["input_ids"], labels=batch["labels"], loss_mask=batch.get("loss_mask"),
                              loss_chunk=self.config.train.loss_chunk, attention_mask=batch.get("attention_mask"),
                              position_ids=batch.get("position_ids"))

    def micro_step(self, batch: dict[str, torch.Tensor], loss_scale: float, last: bool) -> tuple[torch.Tensor, int]:
        """Forward, loss sum x `loss_scale` (the trainer's one normalisation), backward; returns (the detached,
        unscaled loss sum, the batch's target tokens), the count read on the host before the batch moves."""
        tokens = target_tokens(batch)
        batch = self._to_device(batch)
        with self.accumulation_context(last):
            loss = self.loss_sum(batch)
            (loss * loss_scale).backward()
        return loss.detach(), tokens

    def optimizer_step(self) -> torch.Tensor | None:
        """Clip, step, zero the gradients; returns the gradient norm before clipping.

        With a NaN policy, non-finite gradients (the norm is global: every rank decides alike) skip the
        update and set `skipped`; reading the norm back is the one host sync of the step.
        """
        norm, clip = None, self.config.optim.grad_clip
        self.skipped, self.nonfinite = False, []
        if clip > 0 or self.check_finite:
            norm = nn.utils.clip_grad_norm_(self.parameters, clip if clip > 0 else float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor
            if self.check_finite and not torch.isfinite(norm):
                self.skipped = True
                self.nonfinite = nonfinite_grads(self.module)
                self.optimizer.zero_grad(set_to_none=True)
                return norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @functools.cached_property
    def parameters(self) -> list[nn.Parameter]:
        """The module's parameters, listed once: walking the module tree costs 0.16 ms of host time a step."""
        return list(self.module.parameters())

    def set_lr(self, lr: float) -> None:
        """The schedule's rate for this step: optim.lr's groups get it, Muon's the same fraction of optim.muon_lr."""
        for group, ratio in zip(self.optimizer.param_groups, self.lr_ratios):
            group["lr"] = lr * ratio

    @functools.cached_property
    def lr_ratios(self) -> list[float]:
        return [lr_ratio(group, self.config.optim) for group in self.optimizer.param_groups]

    def resume(self, path: Path, saved_world_size: int) -> None:
        """`load`, then the configured hyperparameters in every optimizer group, not the checkpoint's
        (tlm.training.optim.apply_hyperparameters), by each group's role as built (the load replaces the groups)."""
        roles = [group.get("role") for group in self.optimizer.param_groups]
        self.load(path, saved_world_size)
        apply_hyperparameters(self.optimizer.param_groups, roles, self.config.optim)

    def train_mode(self, training: bool) -> None:
        self.module.train(training)

    def save(self, path: Path) -> None:
        raise NotImplementedError

    def load(self, path: Path, saved_world_size: int) -> None:
        raise NotImplementedError

    def full_state_dict(self, path: Path) -> dict[str, torch.Tensor] | None:
        """fp32 weights on rank 0 (None elsewhere); every rank calls it, after `save(path)`."""
        raise NotImplementedError

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.info.device, non_blocking=True) for k, v in batch.items()}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens a batch's loss counts: every label of packed rows, the masked-in ones otherwise (read on the host,
    where the batch still is: no device sync)."""
    mask = batch.get("loss_mask")
    return batch["labels"].numel() if mask is None else int(mask.sum())


def nonfinite_grads(module: nn.Module) -> list[str]:
    """Names of the parameters with a NaN or Inf in this rank's part of their gradient."""
    names = []
    for name, param in module.named_parameters():
        grad = param.grad
        grad = getattr(grad, "_local_tensor", grad)  # FSDP2: this rank's shard
        if grad is not None and not torch.isfinite(grad).all():
            names.append(name)
    return names
