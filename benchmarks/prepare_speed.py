"""Throughput and peak memory of `tlm prepare`, on a corpus and on the same corpus repeated N times.

Each run is a separate `tlm prepare` process; its peak resident memory is that of its process tree (its
tokenizing workers included, benchmarks/measure.py). A tokenizer is trained first (on the first
`tokenizer_chars` characters) unless one is given.
Prints a table on stderr and one JSON object on the last line of stdout.

    python benchmarks/prepare_speed.py                                   # the bundled demo set, x1 and x10
    python benchmarks/prepare_speed.py --data=PATH/gutenberg-train.jsonl.xz --repeats='[1, 10]'
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import fire

from data_pipeline import DEMO_TRAIN

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402


def run_measured(args: list[str]) -> tuple[dict, float, float]:
    """Run a tlm command; return its last-line JSON, wall seconds and the peak RSS of its process tree in MB."""
    stdout, seconds, _, peak = measure.run_measured([sys.executable, "-m", "tlm", *args])
    return json.loads(stdout.strip().splitlines()[-1]), seconds, peak


def main(data: str = str(DEMO_TRAIN), repeats: tuple[int, ...] = (1, 10), tokenizer: str | None = None,
         tokenizer_chars: int = 50_000_000, seq_len: int = 512, work_dir: str | None = None) -> dict:
    """Measure prepare on `data` repeated each of `repeats` times."""
    work = Path(work_dir or tempfile.mkdtemp(prefix="tlm-prepare-bench-"))
    if tokenizer is None:
        tokenizer = str(work / "tokenizer")
        run_measured(["tokenizer", "--data", data, "--out", tokenizer, "--max-chars", str(tokenizer_chars), "--overwrite"])
    rows = []
    for n in repeats:
        figures, seconds, peak = run_measured([
            "prepare", "--data", json.dumps([data] * n), "--tokenizer", tokenizer, "--out", str(work / f"x{n}"),
            "--seq_len", str(seq_len), "--overwrite",
        ])
        manifest = json.loads((work / f"x{n}" / "manifest.json").read_text())
        tokens = sum(v["tokens"] for v in manifest["splits"].values())
        text_mb = manifest["characters"] / 1e6
        rows.append({"repeat": n, "text_mb": round(text_mb, 1), "tokens": tokens, "seconds": round(seconds, 1),
                     "mb_per_s": round(text_mb / seconds, 2), "tokens_per_s": round(tokens / seconds),
                     "peak_rss_mb": round(peak, 1)})
        print(f"x{n}: {text_mb:.0f} MB of text, {tokens:,} tokens in {seconds:.1f} s: {text_mb / seconds:.2f} MB/s, "
              f"{tokens / seconds:,.0f} tokens/s, peak RSS {peak:.0f} MB", file=sys.stderr)
    result = {"data": data, "seq_len": seq_len, "cpus": os.cpu_count(), "rows": rows}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
