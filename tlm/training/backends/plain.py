"""Plain PyTorch: one process, or DistributedDataParallel across ranks; fp32 parameters, autocast for bf16."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tlm.model.transformer import TransformerLM
from tlm.training.backends.base import Backend
from tlm.training.config import TrainConfig
from tlm.training.distributed import DistInfo
from tlm.training.optim import build_optimizer
from tlm_base.fileio import atomic_write_bytes


class PlainBackend(Backend):
    """One process, or DistributedDataParallel across ranks; fp32 parameters, autocast for bf16."""

    name = "ddp"

    def __init__(self, model: TransformerLM, config: TrainConfig, info: DistInfo) -> None:
        super().__init__(model, config, info)
        self.module = model.to(info.device)
        self.model = torch.compile(self.module) if config.train.compile else self.module
        if info.world_size > 1:
            ids = [info.device.index] if info.device.type == "cuda" else None
            # no buffer sync in forward: the model's one buffer (RoPE's inv_freq) is computed alike on every rank,
            # and DDP would broadcast it in every forward (a collective per micro-step for nothing)
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=False)
        self.optimizer = build_optimizer(self.module, config.optim, fused=self.fused)

    def accumulation_context(self, last):
        return contextlib.nullcontext() if last or self.info.world_size == 1 else self.model.no_sync()

    def save(self, path):
        if self.info.is_main:
            import io

            buffer = io.BytesIO()
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}, buffer)
            atomic_write_bytes(path / "state.pt", buffer.getvalue())

    def load(self, path, saved_world_size):
        state = torch.load(path / "state.pt", map_location=self.info.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_state_dict(self, path):
        return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()} if self.info.is_main else None
