"""Process groups and the few collectives the trainer needs, apart from the backends: the launcher's environment
read once (torchrun, the deepspeed launcher, srun), the group started when needed, a value broadcast from rank 0,
a sum across ranks and a barrier (each a no-op in one process)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tlm.training.config import TrainConfig


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over the ranks, in place (unchanged in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous of processes started here)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_collective_timeout(seconds: float, *groups: Any) -> None:
    """From now on a collective of the default group (and of `groups`) waits at most `seconds` for the other ranks,
    then fails on every rank that waits (gloo raises; NCCL's watchdog aborts). Torch's own default (30 minutes for
    gloo, 10 for NCCL) stays for setup, where rank 0 may prepare data while the others wait."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout

    for group in {None, *groups}:
        _set_pg_timeout(timedelta(seconds=seconds), group)


def lost_peer(error: BaseException, timeout_s: float) -> str | None:
    """What a collective's failure says about the other ranks, in words (None when `error` is not such a failure):
    a peer that closed its connections (it crashed or was killed) or none answering within the timeout."""
    text = str(error)
    if not isinstance(error, (RuntimeError, dist.DistError)):
        return None
    closed = re.search(r"(Connection closed by peer|Connection reset by peer|Broken pipe)\s*(\[[^\]]*\]:?\d*)?", text)
    if closed:
        where = f" ({closed.group(2).replace('[', '').replace(']', '')})" if closed.group(2) else ""
        return f"another rank closed its connection{where}: it failed or was killed (its own log says why)"
    if re.search(r"[Tt]imed out|[Tt]imeout|Watchdog caught collective", text):
        return (f"no answer from the other ranks within {timeout_s:g} s (train.collective_timeout_s): a rank hung, "
                "or its node went down or lost its link")
    return None
