"""Training backends: plain PyTorch (one process or DDP), DeepSpeed ZeRO 0-3, and FSDP2.

Each wraps the model from outside (the model file knows nothing of them) and offers the same few
operations to the training loop: a micro-step (forward, loss, backward), an optimizer step, save / load
of its own checkpoint, and a full fp32 state dict for the consolidated model directory.

Precision "bf16" means bf16 compute with fp32 master weights and fp32 gradient accumulation:
- plain and DeepSpeed ZeRO-0: fp32 parameters under torch.autocast(bf16) (DeepSpeed's `torch_autocast`;
  its bf16 engine cannot accumulate fp32 gradients without ZeRO);
- DeepSpeed ZeRO 1-3: bf16 parameters, fp32 master copy in the optimizer, `grad_accum_dtype: fp32`;
- FSDP2: fp32 sharded parameters, `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`.

One file per backend: base.py (the interface), plain.py (one process and DDP), zero.py (DeepSpeed), universal.py
(DeepSpeed's conversion for another world size), fsdp2.py; the process group is tlm.training.distributed's.
Here: which backend a config asks for, and its rules for resuming a checkpoint.
"""

from __future__ import annotations

import torch

from pathlib import Path
from typing import Any

import torch.distributed as dist

from tlm.model.transformer import TransformerLM
from tlm.training.backends.base import Backend
from tlm.training.config import BatchShape, TrainConfig
from tlm.training.distributed import DistInfo


def make_backend(model: TransformerLM, config: TrainConfig, info: DistInfo, shape: BatchShape,
                 load_universal: bool = False) -> Backend:
    """The backend `config.train.backend` names, around `model` (imported only when chosen: DeepSpeed is slow to
    import)."""
    kind = config.train.backend
    model.activation_checkpointing = config.train.activation_checkpointing  # before any wrapping or compiling
    if config.train.compile:
        # Each run compiles afresh, as in a process of its own. Dynamo keeps the graphs of every model compiled
        # earlier in the process (one per architecture, grad mode and batch shape); past 8 for TransformerLM.forward
        # (its recompile_limit) it ran that function eagerly for the rest of the process, with one warning. `tlm
        # ablate` trains its runs in one process, so 15 committed CPU runs (NoPE, SiLU, the KV-head counts) had
        # trained uncompiled, with eager bf16's other bits, although their recipe says compile: true.
        torch._dynamo.reset()
    if kind in ("single", "ddp"):
        from tlm.training.backends.plain import PlainBackend

        return PlainBackend(model, config, info)
    if kind == "deepspeed":
        from tlm.training.backends.zero import DeepSpeedBackend

        return DeepSpeedBackend(model, config, info, shape, load_universal)
    from tlm.training.backends.fsdp2 import FSDP2Backend

    return FSDP2Backend(model, config, info)


def check_resume(path: Path, state: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume a checkpoint another backend wrote (its files are another format). Plain and DDP share
    one format; DeepSpeed's must come from the same ZeRO stage."""
    from tlm_base.errors import CheckpointError

    backend = config.train.backend
    plain = ("single", "ddp")  # a single process resumes DDP's checkpoint and vice versa
    same = state["backend"] == backend or {state["backend"], backend} <= set(plain)
    if not same or (backend == "deepspeed" and state["zero_stage"] != config.train.zero_stage):
        raise CheckpointError(f"{path} was written by backend {state['backend']} (ZeRO {state['zero_stage']}); "
                              f"this run uses {backend} (ZeRO {config.train.zero_stage})")


def prepare_resume(path: Path, state: dict[str, Any], config: TrainConfig, info: DistInfo) -> bool:
    """Whether this backend loads the checkpoint through DeepSpeed's universal format (a ZeRO 1-3 checkpoint
    written by another number of ranks), converting it once on rank 0; plain and FSDP2 re-shard by themselves."""
    universal = (state["world_size"] != info.world_size and config.train.backend == "deepspeed"
                 and config.train.zero_stage > 0)
    if universal and info.is_main:
        from tlm.training.backends.universal import convert_to_universal

        convert_to_universal(path / "backend")
    if dist.is_initialized():
        dist.barrier()
    return universal
