"""The cost of document masking on this machine: a training step (forward, backward) of a preset on packed rows
without a mask (SDPA's causal kernel), with the block-diagonal document mask, and with it plus restarted
positions, alternated step by step (benchmarks/alternate.py). Documents are cut at random lengths (mean
`doc_len` tokens), as in packed pretraining rows. Prints fastest and median per contender and the load
average; JSON on the last line.

    python benchmarks/document_masking.py                           # tlm-26m shape, batch 4 x 512, 1 thread
    python benchmarks/document_masking.py --preset=debug --seq=256
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alternate import alternate  # noqa: E402
from data_pipeline.stream import document_masks  # noqa: E402
from tlm.model.config import get_preset  # noqa: E402
from tlm.model.transformer import TransformerLM  # noqa: E402


def main(preset: str = "tlm-26m", batch: int = 4, seq: int = 512, doc_len: int = 200, steps: int = 6, warmup: int = 1,
         threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TransformerLM(get_preset(preset))
    ids = torch.randint(3, model.config.vocab_size, (batch, seq + 1))
    ids[torch.rand(batch, seq + 1) < 1 / doc_len] = 0  # end-of-text at random: documents of ~doc_len tokens
    inputs, labels = ids[:, :-1], ids[:, 1:]
    extra = {"causal (no mask)": {}, "document mask": document_masks(inputs, 0, False),
             "document mask + positions": document_masks(inputs, 0, True)}

    def step(kwargs: dict) -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(inputs, labels=labels, **kwargs)
        loss.backward()

    result = alternate({name: (lambda k=kwargs: step(k)) for name, kwargs in extra.items()}, steps, warmup)
    base = result["causal (no mask)"]["median"]
    for name in extra:
        r = result[name]
        print(f"{name:28s} fastest {r['fastest']:.3f} s, median {r['median']:.3f} s ({r['median'] / base:.2f}x)",
              file=sys.stderr)
    print(f"load average {result['load_average']}", file=sys.stderr)
    summary = {"preset": preset, "batch": batch, "seq": seq, "threads": threads, "load_average": result["load_average"],
               **{name: {k: round(result[name][k], 4) for k in ("fastest", "median")} for name in extra}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
