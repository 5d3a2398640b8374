"""Training backends: plain PyTorch (one process or DDP), DeepSpeed ZeRO 0-3, and FSDP2.

Each wraps the model from outside (the model file knows nothing of them) and offers the same few
operations to the training loop: a micro-step (forward, loss, backward), an optimizer step, save / load
of its own checkpoint, and a full fp32 state dict for the consolidated model directory.

Precision "bf16" means bf16 compute with fp32 master weights and fp32 gradient accumulation:
- plain and DeepSpeed ZeRO-0: fp32 parameters under torch.autocast(bf16) (DeepSpeed's `torch_autocast`;
  its bf16 engine cannot accumulate fp32 gradients without ZeRO);
- DeepSpeed ZeRO 1-3: bf16 parameters, fp32 master copy in the optimizer, `grad_accum_dtype: fp32`;
- FSDP2: fp32 sharded parameters, `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tlm_base.errors import CheckpointError, ConfigError
from tlm_base.fileio import atomic_write_bytes, atomic_write_json
from tlm_base.folders import replace_folder
from tlm.model.transformer import TransformerLM
from tlm.training.optim import adamw, param_groups
from tlm.training.config import TrainConfig

log = logging.getLogger("tlm")
DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
DS_TAG = "deepspeed"


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0




class Backend:
    """The interface the training loop uses."""

    name = "base"

    def __init__(self, model: TransformerLM, config: TrainConfig, info: DistInfo, accumulation: int) -> None:
        self.config = config
        self.info = info
        self.accumulation = accumulation
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

    def micro_step(self, batch: dict[str, torch.Tensor], loss_scale: float, last: bool) -> torch.Tensor:
        """Forward, loss x loss_scale, backward; returns the detached unscaled loss sum."""
        batch = self._to_device(batch)
        with self.accumulation_context(last):
            loss = self.loss_sum(batch)
            (loss * loss_scale).backward()
        return loss.detach()

    def optimizer_step(self) -> torch.Tensor | None:
        """Clip, step, zero the gradients; returns the gradient norm before clipping.

        With a NaN policy, non-finite gradients (the norm is global: every rank decides alike) skip the
        update and set `skipped`; reading the norm back is the one host sync of the step.
        """
        norm, clip = None, self.config.optim.grad_clip
        self.skipped, self.nonfinite = False, []
        if clip > 0 or self.check_finite:
            norm = nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip > 0 else float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor
            if self.check_finite and not torch.isfinite(norm):
                self.skipped = True
                self.nonfinite = nonfinite_grads(self.module)
                self.optimizer.zero_grad(set_to_none=True)
                return norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

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


def nonfinite_grads(module: nn.Module) -> list[str]:
    """Names of the parameters with a NaN or Inf in this rank's part of their gradient."""
    names = []
    for name, param in module.named_parameters():
        grad = param.grad
        grad = getattr(grad, "_local_tensor", grad)  # FSDP2: this rank's shard
        if grad is not None and not torch.isfinite(grad).all():
            names.append(name)
    return names


class PlainBackend(Backend):
    """One process, or DistributedDataParallel across ranks; fp32 parameters, autocast for bf16."""

    name = "ddp"

    def __init__(self, model: TransformerLM, config: TrainConfig, info: DistInfo, accumulation: int) -> None:
        super().__init__(model, config, info, accumulation)
        self.module = model.to(info.device)
        self.model = torch.compile(self.module) if config.train.compile else self.module
        if info.world_size > 1:
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = adamw(param_groups(self.module, config.optim), config.optim, fused=self.fused)

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


def deepspeed_config(config: TrainConfig, info: DistInfo, accumulation: int, load_universal: bool) -> dict[str, Any]:
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
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * info.world_size,
        "gradient_clipping": config.optim.grad_clip,
    })
    if config.train.precision == "bf16":
        if stage == 0:
            ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        else:
            ds["bf16"] = {"enabled": True}
            ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


class DeepSpeedBackend(Backend):
    """DeepSpeed engine around the model and a torch AdamW (nothing to compile)."""

    name = "deepspeed"

    def __init__(self, model, config, info, accumulation, load_universal: bool = False) -> None:
        super().__init__(model, config, info, accumulation)
        import deepspeed

        ds_config = deepspeed_config(config, info, accumulation, load_universal)
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the process group already started
        model = model.to(info.device)
        # ZeRO 1-3 skip a step with non-finite gradients themselves; ZeRO-0 steps the torch optimizer
        # directly, so it gets one that skips (and says so through `overflow`, as DeepSpeed's own do).
        guarded = self.check_finite and config.train.zero_stage == 0
        optimizer = adamw(param_groups(model, config.optim), config.optim, fused=self.fused, skip_nonfinite=guarded)
        if info.device.type == "cpu" and info.is_main:
            _announce_shm_build()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.module = self.engine.module
        if config.train.compile:
            self.engine.compile()
        self.stage = config.train.zero_stage

    def train_mode(self, training):
        self.engine.train(training)

    def loss_sum(self, batch):
        return self.engine(batch["input_ids"], labels=batch["labels"], loss_mask=batch.get("loss_mask"),
                           loss_chunk=self.config.train.loss_chunk, attention_mask=batch.get("attention_mask"),
                           position_ids=batch.get("position_ids"))

    def micro_step(self, batch, loss_scale, last):
        batch = self._to_device(batch)
        loss = self.loss_sum(batch)
        # The loss is already normalised over the whole step, so DeepSpeed must not divide it again.
        self.engine.backward(loss * loss_scale, scale_wrt_gas=False)
        self.engine.step()
        return loss.detach()

    def optimizer_step(self):
        norm = self.engine.get_global_grad_norm()
        norm = None if norm is None else torch.as_tensor(float(norm))
        applied = getattr(self.engine, "_step_applied", True)
        self.skipped = self.check_finite and (not applied or (norm is not None and not torch.isfinite(norm)))
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


UNIVERSAL_CONVERTER = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
CONVERTED = "CONVERTED"  # written into the universal folder once the converter has exited 0


def convert_to_universal(path: Path) -> None:
    """DeepSpeed's universal checkpoint of `path/deepspeed`, for loading on another world size (rank 0).

    The converter writes into a temporary folder beside `path/deepspeed_universal`, which is swapped in with a
    CONVERTED marker only when it exited 0 (`replace_folder`); a conversion folder without the marker (one made
    by an older tlm, or by hand) is redone, and a leftover temporary one is deleted. The converter and its pool
    of workers run in their own session, killed as a group when tlm is interrupted or dies (`run_as_group`)."""
    target = path / f"{DS_TAG}_universal"
    if (target / CONVERTED).is_file():
        return
    log.info("converting %s to a universal checkpoint for a new world size", path)
    with replace_folder(target, "universal checkpoint folder") as tmp:
        command = [*UNIVERSAL_CONVERTER, "--input_folder", str(path / DS_TAG), "--output_folder", str(tmp),
                   "--inject_missing_state"]
        code, output = run_as_group(command)
        if code != 0:  # its output kept beside the checkpoint; the error is one line
            report = path / "ds_to_universal.log"
            atomic_write_bytes(report, output.encode("utf-8", "replace"))
            last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
            raise CheckpointError(f"DeepSpeed's ds_to_universal could not convert {path} for a new world size (exit "
                                  f"status {code}: {last.strip()[:200]}); its output is in {report}; resume on the "
                                  "checkpoint's own number of ranks, or from another checkpoint")
        atomic_write_json(tmp / CONVERTED, {"converted_from": DS_TAG, "exit_status": code})
    if (path / "latest_universal").is_file():  # the converter names its output folder there: the temporary name
        atomic_write_bytes(path / "latest_universal", target.name.encode())


# The parent of a command run by run_as_group: the leader of the command's session, which kills the whole
# session (the command and every process it started) when tlm is gone -- even by SIGKILL, which no handler in
# tlm can catch: it notices within 0.2 s that its parent has changed.
_WATCHDOG = """
import os, signal, subprocess, sys, time
tlm, child = int(sys.argv[1]), subprocess.Popen(sys.argv[2:])
while child.poll() is None:
    if os.getppid() != tlm:
        os.killpg(0, signal.SIGKILL)
    time.sleep(0.2)
sys.exit(child.returncode)
"""


def run_as_group(command: list[str]) -> tuple[int, str]:
    """Run `command` in its own session and return (exit status, its stdout and stderr). No process of it outlives
    this call: whatever is left of the session when the command exits, or when tlm is interrupted (Ctrl-C, an
    exception) or killed, is SIGKILLed as a group."""
    with tempfile.TemporaryFile() as output:  # not a pipe: a stray worker holding it open cannot hang the read
        proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *command], stdout=output,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait()
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        output.seek(0)
        return code, output.read().decode("utf-8", "replace")


class FSDP2Backend(Backend):
    """torch's fully_shard on every decoder layer and the root; DCP checkpoints (re-shardable)."""

    name = "fsdp2"

    def __init__(self, model, config, info, accumulation) -> None:
        super().__init__(model, config, info, accumulation)
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


def make_backend(model: TransformerLM, config: TrainConfig, info: DistInfo, accumulation: int,
                 load_universal: bool = False) -> Backend:
    kind = config.train.backend
    model.activation_checkpointing = config.train.activation_checkpointing  # before any wrapping or compiling
    if kind in ("single", "ddp"):
        return PlainBackend(model, config, info, accumulation)
    if kind == "deepspeed":
        return DeepSpeedBackend(model, config, info, accumulation, load_universal)
    return FSDP2Backend(model, config, info, accumulation)


def init_distributed(config: TrainConfig) -> DistInfo:
    """Read the launcher's environment (torchrun, deepspeed, srun) and start the process group when needed."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and config.train.device in ("auto", "cuda")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        env.setdefault("DS_ACCELERATOR", "cpu")
    needs_group = world > 1 or config.train.backend in ("deepspeed", "fsdp2")
    if needs_group and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "MASTER_ADDR" in env:  # a launcher's rendezvous
            dist.init_process_group(backend=backend, device_id=device if cuda else None)
        else:  # one process: a private group, not RANK / WORLD_SIZE in the environment (jobs it starts inherit that)
            env.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                    world_size=1, device_id=device if cuda else None)
    return DistInfo(rank, world, local_rank, device)


def from_rank0(value: Any) -> Any:
    """`value` as rank 0 has it, on every rank (a no-op in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _announce_shm_build() -> None:
    """DeepSpeed on CPU compiles its shared-memory communication op (ninja) the first time, silently, for up to
    a few minutes on a small machine: say so, and where it is cached, so that nobody thinks the run hangs."""
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    if not list(cache.glob("*/deepspeed_shm_comm*/*.so")):
        log.info("DeepSpeed on CPU builds its shared-memory communication op on first use: about a minute (up to a "
                 "few on 2 cores) with no output; it is cached in %s for later runs", cache)


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous of processes started here)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        convert_to_universal(path / "backend")
    if dist.is_initialized():
        dist.barrier()
    return universal
