"""FSDP2: torch's fully_shard on units of consecutive decoder layers and the root, DCP checkpoints (re-shardable)."""

from __future__ import annotations

import contextlib

import torch

from tlm.training.backends.base import Backend
from tlm.training.optim import build_optimizer
from tlm.training.plan import fsdp2_units


class FSDP2Backend(Backend):
    """torch's fully_shard on units of consecutive decoder layers (tlm.training.plan.fsdp2_units: up to 5e7 parameters
    each, a larger layer alone, the root alone for a model within that) and on the root; DCP checkpoints (re-shardable,
    so a checkpoint resumes under other units too: the parameter names do not change)."""

    name = "fsdp2"
    gathers_in_forward = True

    def __init__(self, model, config, info) -> None:
        super().__init__(model, config, info)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = model.to(info.device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else MixedPrecisionPolicy()
        if config.train.compile:
            for layer in model.layers:
                layer.compile()  # per block, before sharding (torchtitan's order)
        sizes = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
        for unit in fsdp2_units(sizes, sum(p.numel() for p in model.parameters())):
            layers = [model.layers[i] for i in unit]
            fully_shard(layers if len(layers) > 1 else layers[0], mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        self.module = self.model = model
        self.optimizer = build_optimizer(model, config.optim, fused=self.fused)

    def autocast(self):
        return contextlib.nullcontext()  # the mixed-precision policy casts

    def accumulation_context(self, last):
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def save(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path / "dcp"))

    def load(self, path, saved_world_size):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def full_state_dict(self, path):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.float() for k, v in state.items()} if self.info.is_main else None
