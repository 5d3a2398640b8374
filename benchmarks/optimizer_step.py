"""Seconds per training step with AdamW and with Muon, side by side (study 10's "time to target" in CPU seconds).

The ablation runs' own CPU seconds depend on what else shared the machine while they ran; this measures the two
optimizers in one process, alternated step by step (benchmarks/alternate.py), on the CPU-scale study's model and
batch (configs/ablations/cpu.yaml: 16 x 128 tokens, bf16 autocast, torch.compile, one thread): forward, backward,
clipping, the optimizer step, zero_grad, from the same initial weights and batches. Prints each optimizer's fastest
and median step, the ratio, the load average, and the JSON on the last line.

    python benchmarks/optimizer_step.py                  # ~2 minutes on one core
    python benchmarks/optimizer_step.py --steps=100 --threads=2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alternate import alternate  # noqa: E402

from tlm.model.transformer import TransformerLM  # noqa: E402
from tlm.studies.catalogue import base_config_path  # noqa: E402
from tlm.training.config import load_config  # noqa: E402
from tlm.training.optim import build_optimizer  # noqa: E402


def main(steps: int = 60, warmup: int = 5, threads: int = 1, compile: bool = True) -> None:
    """Median and fastest seconds per step of each optimizer over `steps` alternated steps."""
    torch.set_num_threads(threads)
    base = load_config(base_config_path("cpu"))
    batch, seq = base.batch.micro_batch_size, base.data.seq_len
    contenders, losses = {}, {}
    for name in ("adamw", "muon"):
        config = load_config(base_config_path("cpu"), {"optim.name": name})
        torch.manual_seed(0)
        model = TransformerLM(config.model)
        optimizer = build_optimizer(model, config.optim)
        forward = torch.compile(model) if compile else model
        generator = torch.Generator().manual_seed(1)
        losses[name] = []

        def step(model=model, optimizer=optimizer, forward=forward, generator=generator, name=name) -> None:
            ids = torch.randint(0, config.model.vocab_size, (batch, seq), generator=generator)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = forward(ids, labels=ids) / ids.numel()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[name].append(float(loss.detach()))

        contenders[name] = step
    result = alternate(contenders, steps, warmup)
    out = {name: {"fastest_s": result[name]["fastest"], "median_s": result[name]["median"]} for name in contenders}
    out.update(muon_over_adamw=result["muon"]["median"] / result["adamw"]["median"], threads=threads,
               batch=[batch, seq], load_average=result["load_average"], steps=steps)
    for name in contenders:
        print(f"{name:6s} fastest {out[name]['fastest_s'] * 1e3:7.1f} ms  median {out[name]['median_s'] * 1e3:7.1f} ms "
              f"per step of {batch} x {seq} tokens", file=sys.stderr)
    print(f"muon / adamw (median): {out['muon_over_adamw']:.3f}; load average before {result['load_average']['before']}, "
          f"after {result['load_average']['after']}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    fire.Fire(main)
