"""DeepSpeed ZeRO 0-3: the engine around the model and a torch AdamW, its JSON config filled in from tlm's one
config (ds_configs/zero{stage}.json holds only what tlm does not own)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tlm import data_dir
from tlm.training.backends.base import Backend, target_tokens
from tlm.training.config import BatchShape, TrainConfig
from tlm.training.optim import build_optimizer
from tlm_base.errors import ConfigError

log = logging.getLogger("tlm")
DS_CONFIG_DIR = data_dir("ds_configs", "ds_configs")
DS_TAG = "deepspeed"


def deepspeed_config(config: TrainConfig, shape: BatchShape, load_universal: bool) -> dict[str, Any]:
    """ds_configs/zero{stage}.json with every field tlm owns filled in from the one config."""
    stage = config.train.zero_stage
    path = DS_CONFIG_DIR / f"zero{stage}.json"
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} is missing")
    ds = json.loads(path.read_text())
    owned = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
             "bf16", "fp16", "torch_autocast", "optimizer", "scheduler")
    stated = [k for k in owned if k in ds]
    if stated:
        raise ConfigError(f"{path} states {', '.join(stated)}: these come from the tlm config (batch, optim, "
                          "train.precision); remove them from the JSON so that nothing is stated twice")
    micro = config.batch.micro_batch_size
    ds.update({
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": shape.accumulation_steps,
        "train_batch_size": shape.global_batch_size,
        # ZeRO-0 steps tlm's ClippingAdamW, which clips (DeepSpeed's ZeRO-0 clipping is a Python loop and an all-reduce)
        "gradient_clipping": 0.0 if stage == 0 else config.optim.grad_clip,
    })
    if config.train.precision == "bf16":
        if stage == 0:
            ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        else:
            # the overflow check reads the device back (one or two syncs a step): only with a NaN policy
            ds["bf16"] = {"enabled": True, "check_grad_overflow": config.train.nan_policy != "off"}
            ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


class DeepSpeedBackend(Backend):
    """DeepSpeed engine around the model and a torch AdamW (nothing to compile)."""

    name = "deepspeed"

    def __init__(self, model, config, info, shape: BatchShape, load_universal: bool = False) -> None:
        super().__init__(model, config, info)
        import deepspeed

        ds_config = deepspeed_config(config, shape, load_universal)
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the process group already started
        model = model.to(info.device)
        self.stage = stage = config.train.zero_stage
        # ZeRO 1-3 clip, and skip a step with non-finite gradients, themselves; ZeRO-0 steps the torch optimizer
        # directly, so it gets one that clips and skips (and says so through `overflow`, as DeepSpeed's own do).
        optimizer = build_optimizer(model, config.optim, fused=self.fused, clipping=stage == 0,
                          skip_nonfinite=self.check_finite)
        if info.device.type == "cpu" and info.is_main:
            _announce_shm_build()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        if stage == 0 and info.world_size == 1:
            # ZeRO-0 all-reduces the gradients after backward by itself: in one process a flatten, a copy and a
            # collective of one rank for nothing (the sum of one rank is itself: same bits)
            self.engine.enable_backward_allreduce = False
        self.module = self.engine.module
        if config.train.compile:
            self.engine.compile()
        self.gathers_in_forward = self.stage == 3

    def train_mode(self, training):
        self.engine.train(training)

    def loss_sum(self, batch):
        return self.engine(batch["input_ids"], labels=batch["labels"], loss_mask=batch.get("loss_mask"),
                           loss_chunk=self.config.train.loss_chunk, attention_mask=batch.get("attention_mask"),
                           position_ids=batch.get("position_ids"))

    def micro_step(self, batch, loss_scale, last):
        tokens = target_tokens(batch)
        batch = self._to_device(batch)
        loss = self.loss_sum(batch)
        # The loss is already normalised over the whole step, so DeepSpeed must not divide it again.
        self.engine.backward(loss * loss_scale, scale_wrt_gas=False)
        self.engine.step()
        return loss.detach(), tokens

    def optimizer_step(self):
        """DeepSpeed stepped in the last micro-step. Whether it applied the update is a host flag it already holds
        (its overflow check under ZeRO 1-3, ClippingAdamW's under ZeRO-0), so the norm is not read back here: it is
        returned as it is, a tensor, and read only when logged."""
        norm = self.engine.get_global_grad_norm()
        if norm is not None and not torch.is_tensor(norm):
            norm = torch.tensor(float(norm))  # a float already (inf after an overflow)
        self.skipped = self.check_finite and not getattr(self.engine, "_step_applied", True)
        self.nonfinite = []
        return norm

    def save(self, path):
        self.engine.save_checkpoint(str(path), tag=DS_TAG)

    def load(self, path, saved_world_size):
        tag = DS_TAG
        if saved_world_size != self.info.world_size and self.stage > 0:
            tag = f"{DS_TAG}_universal"
        load_path, _ = self.engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False, load_module_strict=True)
        if load_path is None:
            raise ConfigError(f"DeepSpeed found no checkpoint '{tag}' in {path}")

    def full_state_dict(self, path):
        if self.stage == 0:
            return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()} if self.info.is_main else None
        # ZeRO 1-3: the fp32 master of each parameter, assembled from the optimizer's partitions
        # (a collective under ZeRO-3, so every rank takes part).
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in self.module.named_parameters():
            full = safe_get_full_fp32_param(param)
            if self.info.is_main:
                state[name] = full.detach().float().cpu()
        return state if self.info.is_main else None


def _announce_shm_build() -> None:
    """DeepSpeed on CPU compiles its shared-memory communication op (ninja) the first time, silently, for up to
    a few minutes on a small machine: say so, and where it is cached, so that nobody thinks the run hangs."""
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    if not list(cache.glob("*/deepspeed_shm_comm*/*.so")):
        log.info("DeepSpeed on CPU builds its shared-memory communication op on first use: about a minute (up to a "
                 "few on 2 cores) with no output; it is cached in %s for later runs", cache)
