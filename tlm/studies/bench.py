"""`tlm bench`: training speed of a preset, backend, batch and set of optimisations, on synthetic tokens.

Each configuration runs the real backend (`micro_step` + `optimizer_step`) on random token batches made
before timing (no data loading), `warmup` steps, then `steps` timed steps with one device synchronisation
at each end. Reported: tokens/s, step time, peak memory (CUDA), and MFU = FLOPs per token (tlm.training.metrics,
stated formula) x tokens/s / peak, against the datasheet peak of the device (989 TFLOP/s for H100/H200)
and against the dense bf16 matmul rate measured on the same device in the same run.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import torch

from tlm.training.backends import make_backend
from tlm.training.distributed import init_distributed
from tlm.model.flops import flops_per_token, peak_flops
from tlm.model.transformer import TransformerLM
from tlm.training.config import load_config

log = logging.getLogger("tlm")

# The configurations of the speed matrix (docs/performance.md), as train-config overrides.
MATRIX: dict[str, dict[str, Any]] = {
    "eager": {"train.backend": "single"},
    "compiled": {"train.backend": "single", "train.compile": True},
    "compiled+chunked-loss": {"train.backend": "single", "train.compile": True, "train.loss_chunk": 4096},
    "compiled+chunked, no NaN check": {"train.backend": "single", "train.compile": True, "train.loss_chunk": 4096,
                                       "train.nan_policy": "off"},
    "deepspeed-zero1": {"train.backend": "deepspeed", "train.zero_stage": 1},
    "deepspeed-zero2": {"train.backend": "deepspeed", "train.zero_stage": 2},
    "fsdp2": {"train.backend": "fsdp2"},
}


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 8192, seconds: float = 1.0) -> float:
    """Dense matmul FLOP/s measured on `device` (square size x size, bf16 on CUDA)."""
    if device.type != "cuda":
        size = 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        if device.type == "cuda" and count % 10 == 0:
            torch.cuda.synchronize(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def bench_one(overrides: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    """Time one configuration; returns its figures (the process group, if any, stays for the next)."""
    config = load_config(None, overrides)
    info = init_distributed(config)
    shape = config.batch_shape(info.world_size)
    accumulation, micro, seq = shape.accumulation_steps, shape.micro_batch_size, shape.seq_len
    torch.manual_seed(0)
    model = TransformerLM(config.model)
    backend = make_backend(model, config, info, shape)
    ids = torch.randint(0, model.config.vocab_size, (accumulation, micro, seq + 1))
    batches = [{"input_ids": ids[i, :, :-1], "labels": ids[i, :, 1:]} for i in range(accumulation)]
    if info.device.type == "cuda":
        batches = [{k: v.to(info.device) for k, v in b.items()} for b in batches]
        torch.cuda.reset_peak_memory_stats(info.device)
    scale = info.world_size / shape.tokens_per_step
    backend.set_lr(config.optim.lr)

    def step() -> torch.Tensor:
        loss = torch.zeros((), device=info.device)
        for i, batch in enumerate(batches):
            loss = loss + backend.micro_step(batch, scale, last=i == accumulation - 1)[0]
        backend.optimizer_step()
        return loss

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    final_loss = float(loss)  # the one host-device sync of the timed window
    seconds = (time.perf_counter() - start) / steps
    tokens = shape.tokens_per_step
    result = {"step_time": seconds, "tokens_per_s": tokens / seconds, "warmup_seconds": warmup_seconds,
              "loss": final_loss / (tokens / info.world_size), "global_batch": shape.global_batch_size}
    if info.device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(info.device) / 2**20
    engine = getattr(backend, "engine", None)
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    return result


def bench(configurations: dict[str, dict[str, Any]], base: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    """Run every configuration and add MFU; returns the JSON-ready result."""
    config = load_config(None, base)
    device = init_distributed(config).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    matmul = measured_matmul_flops(device, dtype)
    datasheet = peak_flops(name) if device.type == "cuda" else None
    flops = flops_per_token(config.model, config.data.seq_len)
    rows = {}
    for label, overrides in configurations.items():
        log.info("bench: %s", label)
        try:
            row = bench_one({**base, **overrides}, steps, warmup)
        except Exception as e:  # one failing configuration (e.g. no compiler) must not lose the others
            rows[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        achieved = flops * row["tokens_per_s"]
        row["mfu_vs_datasheet"] = achieved / datasheet if datasheet else None
        row["mfu_vs_measured_matmul"] = achieved / matmul
        rows[label] = row
    return {"device": name, "datasheet_peak_flops": datasheet, "measured_matmul_flops": matmul,
            "matmul_dtype": str(dtype).replace("torch.", ""), "flops_per_token": flops, "base": base,
            "steps": steps, "warmup": warmup, "torch": torch.__version__, "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    out = sys.stderr
    print(f"device: {result['device']}; FLOPs/token {result['flops_per_token'] / 1e6:.1f}M; measured "
          f"{result['matmul_dtype']} matmul {result['measured_matmul_flops'] / 1e12:.2f} TFLOP/s"
          + (f"; datasheet {result['datasheet_peak_flops'] / 1e12:.0f} TFLOP/s" if result["datasheet_peak_flops"] else ""),
          file=out)
    print(f"{'configuration':<32}{'tokens/s':>14}{'step ms':>10}{'MFU (sheet)':>13}{'MFU (meas.)':>13}{'peak MB':>10}", file=out)
    for label, row in result["rows"].items():
        if "error" in row:
            print(f"{label:<32} error: {row['error']}", file=out)
            continue
        sheet = f"{row['mfu_vs_datasheet']:.1%}" if row["mfu_vs_datasheet"] is not None else "-"
        memory = f"{row['peak_memory_mb']:.0f}" if "peak_memory_mb" in row else "-"
        print(f"{label:<32}{row['tokens_per_s']:>14,.0f}{row['step_time'] * 1000:>10.1f}{sheet:>13}"
              f"{row['mfu_vs_measured_matmul']:>13.1%}{memory:>10}", file=out)


def dump(result: dict[str, Any], path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def bench_command(preset: str = "tlm-26m", backend: str = "single", batch: int = 32, seq_len: int = 512,
                  precision: str = "auto", steps: int = 10, warmup: int = 3, compile: bool = False,
                  fused_adamw: bool | None = None, loss_chunk: int = 0, zero_stage: int = 1, matrix: bool = False,
                  out: str | None = None) -> dict[str, Any]:
    """`tlm bench`: one configuration, or the whole matrix; prints the table, writes JSON to `out`."""
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    base = {"model.preset": preset, "batch.micro_batch_size": batch, "data.seq_len": seq_len,
            "train.precision": precision, "logging.wandb": "disabled"}
    single = {"train.backend": backend, "train.compile": compile, "train.fused_adamw": fused_adamw,
              "train.loss_chunk": loss_chunk, **({"train.zero_stage": zero_stage} if backend == "deepspeed" else {})}
    result = bench(MATRIX if matrix else {backend: single}, base, steps, warmup)
    print_table(result)
    dump(result, out)
    return result
