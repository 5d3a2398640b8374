"""`tlm plan`: will a model train on N GPUs of a given memory, and under which backend, ZeRO stage and activation
checkpointing? Per GPU: the bytes of parameters, gradients, optimizer states and activations of each setting,
whether it fits, and the cheapest setting that does.

Model states follow the mixed-precision accounting of DeepSpeed's own estimators (Rajbhandari et al., ZeRO),
so that ZeRO-2 and ZeRO-3 agree with `estimate_zero2_model_states_mem_needs` / `estimate_zero3_...` exactly:

| setting | parameters | gradients | optimizer states |
|---|---|---|---|
| single / DDP (fp32 weights, bf16 autocast) | 4P + 2P (autocast's bf16 copies, kept for backward) | 4P | 8P (Adam m, v) |
| DeepSpeed ZeRO-0 / 1 | 2P (bf16) | 2P (bf16) + 4P/N fp32 at ZeRO-1 (4P at 0) | 12P/N (fp32 master + m + v; N=1 at 0) |
| DeepSpeed ZeRO-2 | 2P | 6P/N | 12P/N |
| DeepSpeed ZeRO-3 | 2P/N + 4L (the largest layer gathered) | 4P/N | 12P/N |
| FSDP2 (fp32 shards, bf16 compute) | 4P/N + 4U (a unit gathered, the next prefetched) | 4P/N | 8P/N |
| Muon (optim.name muon) | as its backend | as its backend | 4M less (M/N sharded): one momentum per hidden-matrix parameter for Adam's two; ZeRO 1-3 left out (refused) |

(P parameters, N GPUs, L the largest layer's parameters, U the largest FSDP2 unit's: consecutive decoder blocks up to
5e7 parameters, a larger block alone, the whole model for one within that; `fsdp2_units`.) Activations are what autograd
keeps for the backward of one micro-batch, counted tensor by tensor for a pre-norm Llama block under bf16
autocast with SDPA (no seq x seq matrix is kept): per token and layer 20h + 8kv + 8i bytes (h the hidden
size, kv the key/value width, i the MLP width), plus the logits (10 bytes per token and vocabulary entry: bf16
logits, their fp32 copy and its gradient; a chunk of them with the chunked loss). Full checkpointing keeps each
layer's fp32 input (4h) and recomputes one layer at a time; selective checkpointing checkpoints the even layers
(about half the saving of full for half its recomputation). A margin (default 10%) covers the allocator's
fragmentation and the communication buffers the formulas leave out.

Which setting: the cheapest that fits, that is the least recomputation, then the least sharding, because sharding
costs host time in every step (benchmarks/host_overhead.py, docs/performance.md: on the 26M model's layers at
negligible width, per step against a bare PyTorch loop, single/DDP ~1.0x, ZeRO-0/1/2 1.1-1.3x, FSDP2 ~1.5x, ZeRO-3
2.2x+). So by model size: single/DDP while the model states fit one GPU whole; ZeRO-1, then ZeRO-2, while the
parameters do; FSDP2 (then ZeRO-3, which costs more host time for the same sharding) only when the parameters
must be sharded too. `size_guide` gives the largest model each takes on a given GPU, and `tlm plan` prints it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tlm.model.config import ModelConfig
from tlm_base.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from tlm.training.config import BatchShape, TrainConfig

log = logging.getLogger("tlm")

CHECKPOINTING = ("none", "selective", "full")
# cheapest first: no sharding before sharding, no recomputation before recomputation; among the backends that shard
# parameters, FSDP2 before ZeRO-3 (less host time per step: docs/performance.md, benchmarks/host_overhead.py)
SETTINGS = [("single", None), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("fsdp2", None), ("deepspeed", 3)]
FSDP2_UNIT = 50_000_000
"""The most parameters FSDP2 shards as one unit of consecutive decoder layers (DeepSpeed ZeRO-3's default prefetch
bucket). Each unit costs host time in every step (its pre-forward, pre-backward and post-backward hooks), so a small
model's layers share few units; a larger layer is a unit alone (llama-1b-shape's 61M: one unit per layer)."""


@dataclass
class PlanRow:
    """One setting's per-GPU bytes."""

    backend: str
    zero_stage: int | None
    activation_checkpointing: str
    parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    total: int
    fits: bool

    @property
    def name(self) -> str:
        stage = f" ZeRO-{self.zero_stage}" if self.zero_stage is not None else ""
        return f"{self.backend}{stage}, checkpointing {self.activation_checkpointing}"


def parameter_counts(config: ModelConfig) -> tuple[int, int, int]:
    """(all parameters, the largest single layer's, one decoder block's), from the shapes: the weight matrices as
    the FLOPs count counts them (tlm.training.metrics.matmul_params), plus the norms and an untied lm_head."""
    from tlm.model.flops import matmul_params

    h, embedding = config.hidden_size, config.vocab_size * config.hidden_size
    norm = h if config.norm != "none" else 0
    block = (matmul_params(config) - embedding) // config.num_hidden_layers + 2 * norm
    total = config.num_hidden_layers * block + embedding * (1 if config.tie_word_embeddings else 2) + norm
    largest = max(embedding, h * config.intermediate_size, h * config.num_attention_heads * config.head_dim)
    return total, largest, block


def fsdp2_units(layer_sizes: list[int], total: int, budget: int | None = None) -> list[list[int]]:
    """The decoder layers FSDP2 shards together, unit by unit (their indices), from their parameter counts: consecutive
    layers up to `budget` (FSDP2_UNIT) parameters per unit; none (the root alone is the one unit) when all `total`
    fit in one."""
    budget = FSDP2_UNIT if budget is None else budget
    if total <= budget:
        return []
    units: list[list[int]] = []
    size = 0
    for i, n in enumerate(layer_sizes):
        if units and size + n <= budget:
            units[-1].append(i)
            size += n
        else:
            units.append([i])
            size = n
    return units


def model_state_bytes(config: ModelConfig, backend: str, zero_stage: int | None, gpus: int,
                      optimizer: str = "adamw") -> tuple[int, int, int]:
    """(parameters, gradients, optimizer states) in bytes per GPU (the table in the module docstring). With Muon
    (optim.name muon: single, DDP, ZeRO-0, FSDP2), the hidden matrices keep one fp32 momentum instead of Adam's two
    moments: 4 bytes less per matrix parameter."""
    p, largest, block = parameter_counts(config)
    n = gpus
    norm = config.hidden_size if config.norm != "none" else 0
    saved = 4 * config.num_hidden_layers * (block - 2 * norm) if optimizer == "muon" else 0
    if backend in ("single", "ddp"):
        return 6 * p, 4 * p, 8 * p - saved
    if backend == "fsdp2":
        units = fsdp2_units([block] * config.num_hidden_layers, p)
        unit = max(len(u) for u in units) * block if units else p
        return 4 * p // n + 4 * unit, 4 * p // n, (8 * p - saved) // n
    if zero_stage == 0:
        return 2 * p, 6 * p, 12 * p - saved
    if zero_stage == 1:
        return 2 * p, 2 * p + 4 * p // n, 12 * p // n
    if zero_stage == 2:
        return 2 * p, 6 * p // n, 12 * p // n
    return 2 * p // n + 4 * largest, 4 * p // n, 12 * p // n


def activation_bytes(config: ModelConfig, micro_batch: int, seq_len: int, checkpointing: str = "none",
                     loss_chunk: int = 0) -> int:
    """What autograd keeps for one micro-batch's backward (the module docstring's formula)."""
    tokens = micro_batch * seq_len
    h, kv, i, v = config.hidden_size, config.num_key_value_heads * config.head_dim, config.intermediate_size, config.vocab_size
    layer = tokens * (20 * h + 8 * kv + 8 * i)
    kept = tokens * 4 * h  # a checkpointed layer keeps its fp32 input
    layers = config.num_hidden_layers
    if checkpointing == "full":
        blocks = layers * kept + layer  # plus one layer recomputed at a time
    elif checkpointing == "selective":  # the even layers (0, 2, ...): recomputing one never raises the peak
        checkpointed = (layers + 1) // 2
        blocks = (layers - checkpointed) * layer + checkpointed * kept + (layer if layers % 2 else 0)
    else:
        blocks = layers * layer
    logits = (min(loss_chunk, tokens) if loss_chunk > 0 else tokens) * v * 10
    return blocks + logits + tokens * 4 * h  # the embedding output


def run_setting(backend: str, zero_stage: int | None, gpus: int) -> tuple[str, int | None]:
    """(backend, ZeRO stage) as the plan names a setting: `single` on several GPUs is DDP; a ZeRO stage means
    nothing to a backend other than DeepSpeed."""
    backend = "ddp" if backend == "single" and gpus > 1 else backend
    return backend, zero_stage if backend == "deepspeed" else None


def plan_row(config: ModelConfig, backend: str, zero_stage: int | None, gpus: int, micro_batch: int, seq_len: int,
             loss_chunk: int = 0, checkpointing: str = "none", margin: float = 0.1, optimizer: str = "adamw") -> PlanRow:
    """The plan of one setting (what `tlm train` prints at start-up); `fits` is left True (no device given)."""
    backend, stage = run_setting(backend, zero_stage, gpus)
    params, grads, optim = model_state_bytes(config, backend, stage, gpus, optimizer)
    acts = activation_bytes(config, micro_batch, seq_len, checkpointing, loss_chunk)
    return PlanRow(backend, stage, checkpointing, params, grads, optim, acts,
                   int((params + grads + optim + acts) * (1 + margin)), True)


def plan_rows(config: ModelConfig, gpus: int, gpu_bytes: int, micro_batch: int, seq_len: int, loss_chunk: int = 0,
              margin: float = 0.1, optimizer: str = "adamw") -> list[PlanRow]:
    """Every setting, cheapest first, with its per-GPU bytes and whether it fits in `gpu_bytes`; with Muon, only
    those it runs under (not DeepSpeed ZeRO 1-3)."""
    settings = [(b, s) for b, s in SETTINGS if optimizer != "muon" or b != "deepspeed" or s == 0]
    rows = [plan_row(config, backend, stage, gpus, micro_batch, seq_len, loss_chunk, checkpointing, margin, optimizer)
            for checkpointing in CHECKPOINTING for backend, stage in settings]
    for row in rows:
        row.fits = row.total <= gpu_bytes
    return rows


# model-state bytes per parameter per GPU on N GPUs (the table above without the gathered layer or unit)
BYTES_PER_PARAMETER = {"single/DDP": lambda n: 18, "DeepSpeed ZeRO-1": lambda n: 4 + 16 / n,
                       "DeepSpeed ZeRO-2": lambda n: 2 + 18 / n, "FSDP2": lambda n: 16 / n,
                       "DeepSpeed ZeRO-3": lambda n: 18 / n}


def size_guide(gpus: int, gpu_bytes: int, margin: float = 0.1) -> dict[str, int]:
    """The backend tlm recommends by model size: for each, in the order tlm prefers them, the most parameters whose
    model states (activations not counted) fit `gpus` GPUs of `gpu_bytes`."""
    return {name: int(gpu_bytes / (1 + margin) / per(gpus)) for name, per in BYTES_PER_PARAMETER.items()}


def size_guide_line(gpus: int, gpu_bytes: int, margin: float = 0.1) -> str:
    """`size_guide` in words: each setting with the models it takes beyond the ones before it (on one GPU: single)."""
    reach, parts = 0, []
    for name, count in size_guide(gpus, gpu_bytes, margin).items():
        if count > reach and (gpus > 1 or name == "single/DDP"):  # on one GPU sharding saves nothing
            parts.append(f"{name} up to {count / 1e9:.2f}B parameters")
            reach = count
    more = "" if gpus > 1 else "; sharding takes more GPUs"
    return (f"by model size (model states only, activations come on top): {', then '.join(parts)}{more}; ZeRO-3 shards "
            "as FSDP2 does for more host time per step (docs/performance.md)")


def recommend(rows: list[PlanRow]) -> PlanRow | None:
    """The cheapest setting that fits. Cheapest means, in this order: the least recomputation (activation
    checkpointing none, selective, full), then the least sharding (single/DDP, DeepSpeed ZeRO-0, 1, 2, FSDP2, ZeRO-3),
    since each costs time in every step (recomputed layers; host time and collectives: docs/performance.md)."""
    return next((row for row in rows if row.fits), None)


def compare_with_recipe(rows: list[PlanRow], backend: str, zero_stage: int, checkpointing: str,
                        gpus: int) -> tuple[PlanRow, str]:
    """The recipe's own setting among `rows` (a plan for `gpus` GPUs), and a line saying whether it fits and how it
    compares with the cheapest (the flags that choose the cheapest instead, when they differ)."""
    setting = (*run_setting(backend, zero_stage, gpus), checkpointing)
    mine = next(r for r in rows if (r.backend, r.zero_stage, r.activation_checkpointing) == setting)
    best = recommend(rows)
    if not mine.fits:
        return mine, f"the recipe's setting ({mine.name}) does not fit" + (f"; the cheapest that does: {best.name}, "
                                                                          f"with {setting_flags(best)}" if best else "")
    if best is mine:
        return mine, f"the recipe's setting ({mine.name}) is the cheapest that fits"
    return mine, (f"the recipe's setting ({mine.name}) fits; cheaper here: {best.name} ({setting_flags(best)}), "
                  "less sharding or recomputation")


def setting_flags(row: PlanRow) -> str:
    """The `tlm train` flags that choose a row's setting."""
    backend = "single" if row.backend == "ddp" else row.backend
    stage = f" --train.zero_stage={row.zero_stage}" if row.zero_stage is not None else ""
    return f"--train.backend={backend}{stage} --train.activation_checkpointing={row.activation_checkpointing}"


def parse_bytes(text: str | int | float) -> int:
    """'80GiB', '141GB', '512MiB' or a number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "B": 1}
    value = str(text).strip().upper().replace(" ", "")
    for unit, factor in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)]
            try:
                result = float(number) * factor
            except ValueError:
                break
            if math.isfinite(result) and result > 0:
                return int(result)
            break
    from tlm_base.errors import ConfigError

    raise ConfigError(f"--gpu_mem {text!r}: give a size such as 80GiB, 141GB or 512MiB")


def row_line(row: PlanRow, per: str = "GPU") -> str:
    g = 2**30
    return (f"{row.name}: {row.total / g:.2f} GiB per {per} (parameters {row.parameters / g:.2f}, gradients "
            f"{row.gradients / g:.2f}, optimizer states {row.optimizer_states / g:.2f}, activations "
            f"{row.activations / g:.2f}, +margin)")


def plan_table(rows: list[PlanRow]) -> list[dict[str, Any]]:
    return [{**asdict(row), "setting": row.name} for row in rows]



def check_memory(model: ModelConfig, config: TrainConfig, shape: BatchShape, device: torch.device,
                 is_main: bool) -> None:
    """Say what the plan expects per device for a run; refuse, before anything is built, a setting whose model
    states and activations (without the plan's margin) exceed the GPU this rank sees."""
    row = plan_row(model, config.train.backend, config.train.zero_stage, shape.world_size, shape.micro_batch_size,
                   shape.seq_len, config.train.loss_chunk, config.train.activation_checkpointing,
                   optimizer=config.optim.name)
    if is_main:
        log.info("memory plan: %s", row_line(row, "GPU" if device.type == "cuda" else "process"))
    if device.type != "cuda":
        return
    import torch

    capacity = torch.cuda.get_device_properties(device).total_memory
    if is_main:
        rows = plan_rows(model, shape.world_size, capacity, shape.micro_batch_size, shape.seq_len,
                         config.train.loss_chunk, optimizer=config.optim.name)
        _, line = compare_with_recipe(rows, config.train.backend, config.train.zero_stage,
                                      config.train.activation_checkpointing, shape.world_size)
        log.info("memory plan on this GPU: %s", line.replace("the recipe's setting", "this run's setting"))
    needed = row.parameters + row.gradients + row.optimizer_states + row.activations
    if needed > capacity:
        raise ConfigError(f"memory plan: {row_line(row)}, more than the {capacity / 2**30:.1f} GiB of "
                          f"{torch.cuda.get_device_name(device)}; `tlm plan --config RECIPE --gpus {shape.world_size}` "
                          "lists the settings that fit (ZeRO stage, micro-batch, loss_chunk)")
