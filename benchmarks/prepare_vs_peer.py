"""`tlm prepare` with 1 and N processes beside a straightforward `datasets` pipeline, on one corpus and tokenizer.

The peer: `datasets.load_dataset("json")` -> `.map(batched tokenize, num_proc=N)` -> `.map(group into rows of
seq_len + 1)` -> `save_to_disk`, the recipe of transformers' run_clm.py. Each contender is a separate process
(its whole tree's peak resident memory sampled from /proc every 50 ms; its CPU time, children included, from
wait4), and the contenders take turns, round by round, the order reversed every other round, so a busy spell of
the machine falls on all of them. Reports fastest and median tokens/s, CPU seconds per million tokens, peak
memory, the load average, and whether tlm's outputs for 1 and N processes are byte-identical. It also reports
the main process's own CPU time per million tokens under N processes: the reader and writer tlm keeps in one
process, whose rate is where adding cores stops helping.

    python benchmarks/prepare_vs_peer.py --data=PATH/gutenberg-train.jsonl.xz --rounds=2
    python benchmarks/prepare_vs_peer.py                      # the bundled demo corpus, quicker
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from alternate import load_average  # noqa: E402
from measure import run_measured  # noqa: E402


def peer(data: str, tokenizer: str, out: str, seq_len: int = 512, num_proc: int = 2, cache: str | None = None) -> None:
    """The peer pipeline (run in its own process by `main`); prints its token count as JSON."""
    import datasets
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer) / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    raw = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)

    def tokenize(batch: dict) -> dict:
        return {"input_ids": [e.ids + [eot] for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}

    def group(batch: dict) -> dict:
        flat = [i for ids in batch["input_ids"] for i in ids]
        usable = len(flat) // (seq_len + 1) * (seq_len + 1)
        return {"input_ids": [flat[i:i + seq_len + 1] for i in range(0, usable, seq_len + 1)]}

    ids = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=raw.column_names)
    rows = ids.map(group, batched=True, batch_size=1000, num_proc=num_proc)
    rows.save_to_disk(out)
    print(json.dumps({"tokens": len(rows) * (seq_len + 1)}))


def shards_sha(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.arrow")) + [folder / "manifest.json"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main(data: str | None = None, tokenizer: str | None = None, seq_len: int = 512, num_proc: int = 2,
         rounds: int = 2, tokenizer_chars: int = 50_000_000, work_dir: str | None = None) -> dict:
    """Alternate tlm (1 process), tlm (`num_proc` processes) and the peer (`num_proc` processes) for `rounds`."""
    from data_pipeline import DEMO_TRAIN

    data = data or str(DEMO_TRAIN)
    work = Path(work_dir or tempfile.mkdtemp(prefix="tlm-prepare-peer-"))
    tlm = [sys.executable, "-m", "tlm"]
    if tokenizer is None:
        tokenizer = str(work / "tokenizer")
        run_measured([*tlm, "tokenizer", "--data", data, "--out", tokenizer, "--max_chars", str(tokenizer_chars),
                      "--overwrite"])
    contenders = {
        "tlm prepare --num_proc 1": lambda out: [*tlm, "prepare", "--data", data, "--tokenizer", tokenizer, "--out",
                                                 out, "--seq_len", str(seq_len), "--val", "0", "--num_proc", "1"],
        f"tlm prepare --num_proc {num_proc}": lambda out: [*tlm, "prepare", "--data", data, "--tokenizer", tokenizer,
                                                           "--out", out, "--seq_len", str(seq_len), "--val", "0",
                                                           "--num_proc", str(num_proc)],
        f"datasets map num_proc={num_proc}": lambda out: [sys.executable, __file__, "peer", "--data", data,
                                                          "--tokenizer", tokenizer, "--out", out, "--seq_len",
                                                          str(seq_len), "--num_proc", str(num_proc), "--cache",
                                                          str(work / f"{Path(out).name}-cache")],
    }
    before = load_average()
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(rounds):
        for index, name in enumerate(names if round_ % 2 == 0 else list(reversed(names))):
            out = work / f"r{round_}-{names.index(name)}"
            stdout, seconds, cpu, peak = run_measured(contenders[name](str(out)))
            figures = json.loads(stdout.strip().splitlines()[-1])
            if name.startswith("tlm"):
                tokens = sum(v["tokens"] for v in figures["splits"].values())
                main_cpu = figures.get("process_cpu_s")
                sha = shards_sha(out)
            else:
                tokens, main_cpu, sha = figures["tokens"], None, None
            results[name].append({"seconds": seconds, "tokens": tokens, "cpu_s": cpu, "peak_rss_mb": peak,
                                  "main_cpu_s": main_cpu, "sha": sha})
            print(f"round {round_} {name}: {tokens:,} tokens in {seconds:.1f} s = {tokens / seconds:,.0f} tokens/s, "
                  f"CPU {cpu:.1f} s, peak RSS {peak:.0f} MB", file=sys.stderr, flush=True)
            subprocess.run(["rm", "-rf", str(out), str(work / f"{out.name}-cache")], check=False)
    after = load_average()
    table = {}
    for name, runs in results.items():
        rates = [r["tokens"] / r["seconds"] for r in runs]
        row = {"tokens": runs[0]["tokens"], "fastest_tokens_per_s": round(max(rates)),
               "median_tokens_per_s": round(statistics.median(rates)),
               "cpu_s_per_m_tokens": round(statistics.median(r["cpu_s"] / r["tokens"] * 1e6 for r in runs), 2),
               "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs))}
        if runs[0]["main_cpu_s"] is not None:
            row["main_process_cpu_s_per_m_tokens"] = round(
                statistics.median(r["main_cpu_s"] / r["tokens"] * 1e6 for r in runs), 2)
        table[name] = row
    one, many = names[0], names[1]
    identical = len({r["sha"] for r in results[one] + results[many]}) == 1
    speedup = table[many]["median_tokens_per_s"] / table[one]["median_tokens_per_s"]
    lead = table[many]["median_tokens_per_s"] / table[names[2]]["median_tokens_per_s"]
    print(f"\n{'contender':32} {'fastest tok/s':>14} {'median tok/s':>13} {'CPU s/M tok':>12} {'peak RSS MB':>12}",
          file=sys.stderr)
    for name, row in table.items():
        print(f"{name:32} {row['fastest_tokens_per_s']:>14,} {row['median_tokens_per_s']:>13,} "
              f"{row['cpu_s_per_m_tokens']:>12} {row['peak_rss_mb']:>12,}", file=sys.stderr)
    print(f"{many} / {one}: {speedup:.2f}x; / peer: {lead:.2f}x; outputs of 1 and {num_proc} processes byte-identical: "
          f"{identical}; load average before {before}, after {after}; {os.cpu_count()} CPUs", file=sys.stderr)
    result = {"data": data, "seq_len": seq_len, "num_proc": num_proc, "rounds": rounds, "cpus": os.cpu_count(),
              "load_average": [before, after], "table": table, "speedup": round(speedup, 3),
              "lead_over_peer": round(lead, 3), "byte_identical": identical}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        fire.Fire(peer, command=sys.argv[2:], serialize=lambda _: None)
    else:
        fire.Fire(main, serialize=lambda _: None)
