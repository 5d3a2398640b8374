"""Time of one training step (forward, backward, AdamW) of a preset on this machine's CPU.

The `debug` preset promises a step well under a second on one CPU core; this script measures it.
Prints a line per shape on stderr and one JSON object on the last line of stdout.

    python benchmarks/train_step.py                                  # debug, 1 thread
    python benchmarks/train_step.py --preset=tlm-26m --batch=2 --seq=128 --threads=2
"""

from __future__ import annotations

import json
import sys
import time

import fire
import torch
import torch.nn.functional as F

from tlm.model.config import get_preset
from tlm.model.transformer import TransformerLM


def main(preset: str = "debug", batch: int = 8, seq: int = 256, steps: int = 10, threads: int = 1) -> dict:
    """Median seconds per optimizer step over `steps` steps after two warm-up steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TransformerLM(get_preset(preset))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
    times, losses = [], []
    for step in range(steps + 2):
        start = time.perf_counter()
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    times.sort()
    median = times[len(times) // 2]
    result = {
        "preset": preset,
        "num_parameters": model.num_parameters(),
        "batch": batch,
        "seq": seq,
        "threads": threads,
        "seconds_per_step": round(median, 4),
        "tokens_per_s": round(batch * seq / median, 1),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
    }
    print(f"{preset}: {batch}x{seq} on {threads} thread(s): {median * 1000:.1f} ms/step, {result['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
