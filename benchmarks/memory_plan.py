"""`tlm plan` against measured memory on this CPU, and what activation checkpointing saves.

Each (preset, checkpointing) runs in its own process: the model is built, then a few training steps (forward with
bf16 autocast as tlm trains on CPU, backward, AdamW) run on random packed rows. Measured: the process's peak
resident memory minus its resident memory just before the model was built (so the interpreter and torch's own
libraries are left out). Planned: `tlm.training.plan` for the single-process backend (model states 16 bytes per
parameter, activations by formula, no margin). Prints one line per setting and JSON on the last line.

    python benchmarks/memory_plan.py                                   # debug and gpt2-small-shape, 4 x 512
    python benchmarks/memory_plan.py --presets='["minimind2-104m"]' --batch=2
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one(preset: str, mode: str, batch: int, seq: int, steps: int = 3) -> None:
    """One measurement (in its own process): JSON with the base and peak RSS in MB."""
    import torch

    from tlm.model.config import get_preset
    from tlm.model.transformer import TransformerLM

    torch.manual_seed(0)
    base = _rss_mb()
    model = TransformerLM(get_preset(preset))
    model.activation_checkpointing = mode
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"base_mb": base, "peak_mb": peak}))


def main(presets: tuple[str, ...] = ("debug", "gpt2-small-shape"), batch: int = 4, seq: int = 512,
         modes: tuple[str, ...] = ("none", "selective", "full"), steps: int = 3) -> dict:
    """Planned and measured MB for every preset and checkpointing mode."""
    sys.path.insert(0, str(REPO))
    from tlm.model.config import get_preset
    from tlm.training.plan import plan_row

    rows = []
    for preset in presets:
        for mode in modes:
            out = subprocess.run([sys.executable, __file__, "one", preset, mode, str(batch), str(seq), str(steps)],
                                 capture_output=True, text=True, check=True, cwd=REPO)
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            used = measured["peak_mb"] - measured["base_mb"]
            row = plan_row(get_preset(preset), "single", None, 1, batch, seq, 0, mode, margin=0.0)
            planned = row.total / 2**20
            activations = row.activations / 2**20
            rows.append({"preset": preset, "checkpointing": mode, "planned_mb": round(planned, 1),
                         "planned_activations_mb": round(activations, 1), "measured_mb": round(used, 1),
                         "measured_over_planned": round(used / planned, 3)})
            print(f"{preset:18s} {mode:9s} planned {planned:8.1f} MB (activations {activations:7.1f}), measured "
                  f"{used:8.1f} MB: {used / planned:.2f}x", file=sys.stderr, flush=True)
    result = {"batch": batch, "seq": seq, "steps": steps, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        one(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        fire.Fire(main, serialize=lambda _: None)
