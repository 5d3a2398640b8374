"""Throughput of the training stream (tokens/s delivered as torch tensors, one process), side by side
with `datasets`' own `load_from_disk(...).with_format("torch")` iteration over the same rows.

Prints a table on stderr and one JSON object on the last line of stdout.

    python benchmarks/stream_speed.py --data=PREPARED_DIR        # a folder written by `tlm prepare`
    python benchmarks/stream_speed.py                            # prepares the bundled demo set first
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np

from data_pipeline import DEMO_TRAIN
from data_pipeline.dataset import TokenRows
from data_pipeline.stream import TokenStream


def timed_tokens(batches, seconds: float) -> float:
    """Tokens/s of an iterator of batches over about `seconds` (after two warm-up batches)."""
    next(batches)
    next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += next(batches)["input_ids"].numel()
    return count / (time.perf_counter() - start)


def main(data: str | None = None, micro_batch_size: int = 64, seconds: float = 5.0, prefetch: int = 4) -> dict:
    """Measure tlm's TokenStream and datasets' torch-formatted iteration on the same token rows."""
    import datasets

    work = Path(tempfile.mkdtemp(prefix="tlm-stream-bench-"))
    if data is None:
        data = str(work / "prepared")
        subprocess.run([sys.executable, "-m", "tlm", "tokenizer", "--data", str(DEMO_TRAIN), "--out", str(work / "tok")],
                       check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "tlm", "prepare", "--data", str(DEMO_TRAIN), "--tokenizer", str(work / "tok"),
                        "--out", data], check=True, capture_output=True)
    rows = TokenRows(data)
    stream = TokenStream(rows, micro_batch_size, seed=0, prefetch=prefetch)
    tlm_rate = timed_tokens(iter(stream), seconds)
    stream.close()

    # The same rows as a datasets.Dataset on disk, read back the way its docs recommend for torch.
    table = rows.gather(np.arange(len(rows)))[0]
    hf_dir = work / "hf"
    datasets.Dataset.from_dict({"input_ids": table[:, :-1], "labels": table[:, 1:]}).save_to_disk(str(hf_dir))
    loaded = datasets.load_from_disk(str(hf_dir)).with_format("torch")

    def hf_batches(dataset):
        while True:
            yield from dataset.iter(batch_size=micro_batch_size)

    # Shuffled is the like-for-like comparison (tlm shuffles); in file order is datasets' best case.
    hf_rate = timed_tokens(hf_batches(loaded.shuffle(seed=0)), seconds)
    hf_ordered_rate = timed_tokens(hf_batches(loaded), seconds)
    result = {
        "rows": len(rows), "seq_len": rows.seq_len, "micro_batch_size": micro_batch_size,
        "tlm_tokens_per_s": round(tlm_rate), "datasets_shuffled_tokens_per_s": round(hf_rate),
        "datasets_in_order_tokens_per_s": round(hf_ordered_rate),
        "ratio_vs_shuffled": round(tlm_rate / hf_rate, 1), "ratio_vs_in_order": round(tlm_rate / hf_ordered_rate, 1),
    }
    print(f"tlm TokenStream (shuffled): {tlm_rate / 1e6:.1f}M tokens/s; datasets with_format('torch'): "
          f"{hf_rate / 1e6:.2f}M shuffled, {hf_ordered_rate / 1e6:.2f}M in order; "
          f"ratio {tlm_rate / hf_rate:.1f}x / {tlm_rate / hf_ordered_rate:.1f}x", file=sys.stderr)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
