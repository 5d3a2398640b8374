"""FSDP2: torch's fully_shard on every decoder layer and the root, DCP checkpoints (re-shardable)."""

from __future__ import annotations

import contextlib

import torch

from tlm.training.backends.base import Backend
from tlm.training.optim import adamw, param_groups


class FSDP2Backend(Backend):
    """torch's fully_shard on every decoder layer and the root; DCP checkpoints (re-shardable)."""

    name = "fsdp2"
    gathers_in_forward = True

    def __init__(self, model, config, info) -> None:
        super().__init__(model, config, info)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = model.to(info.device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else MixedPrecisionPolicy()
        for layer in model.layers:
            if config.train.compile:
                layer.compile()  # per block, before sharding (torchtitan's order)
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        self.module = self.model = model
        self.optimizer = adamw(param_groups(model, config.optim), config.optim, fused=self.fused)

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
