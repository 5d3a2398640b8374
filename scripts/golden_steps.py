"""Golden steps: replay the first steps of every committed CPU ablation run and compare them, bit for bit, with
the committed metrics (issue 21). Every change that touches the model, the loss, the optimizer step, the data
order or the evaluation must pass it before it lands:

    python scripts/golden_steps.py                      # all 23 variants, seed 0, 30 steps: ~9 minutes on 2 cores
    python scripts/golden_steps.py --studies position   # one study's variants (the CI test runs this one)

It runs the runner that made the committed runs, `tlm ablate STUDY --scale cpu --seeds 1 --train.stop_at=STEPS`
(the same recipe, configs/ablations/cpu.yaml, and the catalogue's own overrides, so a variant's settings are not
re-derived from its folder's name; stop_at keeps the schedule of the whole run), in a scratch folder, with one
thread per process as the committed runs had (their summaries say threads: 1). Then, for every seed-0 run it
replayed, it compares each record the replay logged with the committed record of the same step in
docs/ablations/cpu/runs/NAME-seed0/metrics.jsonl: the validation loss at step 0 (eval.at_start: the initial
weights, eval.max_batches batches) with its perplexity, token count and standard error, and at steps 10, 20, ...
the training loss of the window, the gradient norm of its last step, the learning rate, tokens seen, epoch and
skipped steps. Floats are compared exactly (==, not a tolerance): the computation is deterministic on one
thread, and a change that moves any of them moves the committed runs' numbers. The timing fields
(tokens_per_s, step_time) are not compared. With --studies all it also checks that every committed variant was
replayed, so a run added to docs/ablations/cpu/runs without a study to replay it fails too.

The committed numbers are bf16 autocast + torch.compile on an AVX-512 BF16 CPU with torch 2.13.0; another torch
or a CPU without AVX-512 BF16 computes other bits, so elsewhere the script says why and exits 77 (the CI test
then skips) unless --force. Exit status: 0 all equal, 1 a difference (a table of the first ones), 2 the replay
failed.

When a change is meant to move these numbers, rerun the affected variants in full (`tlm ablate STUDY --scale cpu
--seeds 3 --out DIR`), commit their files under docs/ablations/cpu/runs/ (summaries naming runs/NAME, relative
to the sweep's folder), regenerate the report (`tlm ablate report ...`) and say in the commit whether a verdict
moved.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tlm.training.metrics import line_of_descent, read_metrics

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "docs" / "ablations" / "cpu" / "runs"
# The deterministic fields of a metrics.jsonl record (timings and the session record are left out).
COMPARED = ("val_loss", "val_ppl", "val_tokens", "val_loss_se", "val_bpb", "val_bytes",
            "loss", "grad_norm", "lr", "tokens_seen", "epoch", "skipped_steps")
RECORDED_WITH = {"torch": "2.13.0", "cpu_flag": "avx512_bf16"}
SKIP = 77


def why_not_comparable() -> str | None:
    """Why this machine cannot reproduce the committed bits (None when it can)."""
    import torch

    version = torch.__version__.split("+")[0]
    if version != RECORDED_WITH["torch"]:
        return f"the committed runs were computed with torch {RECORDED_WITH['torch']}, this is torch {version}"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if RECORDED_WITH["cpu_flag"] not in flags.split():
        return (f"the committed runs were computed in bf16 on a CPU with {RECORDED_WITH['cpu_flag']} (AVX-512 BF16); "
                "this CPU lacks it, so its bf16 arithmetic differs")
    return None


def records(path: Path) -> dict[int, dict]:
    """step -> the deterministic fields of that step as the run stands (tlm's line_of_descent, as the report reads
    a run: a step's training and validation records merged, the last record of a step winning)."""
    out: dict[int, dict] = {}
    for record in line_of_descent(read_metrics(path)):
        fields = {k: record[k] for k in COMPARED if k in record}
        if fields:
            out[record["step"]] = fields
    return out


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def compare(replayed: Path, committed: Path) -> tuple[int, list[str]]:
    """(values compared, the differences) between a replayed run's metrics and the committed ones."""
    mine, theirs = records(replayed), records(committed)
    compared, diffs = 0, []
    if not mine:
        return 0, ["the replay logged nothing"]
    for step in sorted(mine):
        if step not in theirs:
            diffs.append(f"step {step}: the committed metrics have no record of it")
            continue
        for key, value in mine[step].items():
            if key not in theirs[step]:  # e.g. val_bpb, logged only by runs newer than the committed one
                continue
            compared += 1
            if not same(value, theirs[step][key]):
                delta = f" ({value - theirs[step][key]:+.3g})" if isinstance(value, float) else ""
                diffs.append(f"step {step} {key}: replayed {value!r}, committed {theirs[step][key]!r}{delta}")
    if "val_loss" not in mine.get(0, {}):
        diffs.append("the replay did not evaluate at step 0 (eval.at_start)")
    return compared, diffs


def replay(studies: list[str], steps: int, out: Path, cache: Path | None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for study in studies:
        command = [sys.executable, "-m", "tlm", "ablate", study, "--scale", "cpu", "--seeds", "1", "--out", str(out),
                   "--report", str(out / "report"), f"--train.stop_at={steps}",
                   f"--data.cache_dir={cache or out / 'cache'}"]
        result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
            raise SystemExit(f"golden steps: `tlm ablate {study}` failed (exit status {result.returncode})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", default="all", help="all, or comma-separated study names (default all)")
    parser.add_argument("--steps", type=int, default=30, help="steps to replay (records every 10; default 30)")
    parser.add_argument("--out", type=Path, help="scratch folder (default: a temporary one, deleted after)")
    parser.add_argument("--cache", type=Path, help="data.cache_dir to share the prepared corpus between calls")
    parser.add_argument("--force", action="store_true", help="compare even where the bits cannot be the same")
    args = parser.parse_args(argv)
    reason = why_not_comparable()
    if reason and not args.force:
        print(f"golden steps: not comparable here: {reason}")
        return SKIP
    studies = args.studies.split(",")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="golden-steps-") as scratch:
        out = args.out or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        replay(studies, args.steps, out, args.cache)
        replayed = sorted(p for p in (out / "runs").iterdir() if p.name.endswith("-seed0"))
        failures, total = 0, 0
        for run in replayed:
            committed = COMMITTED / run.name / "metrics.jsonl"
            if not committed.is_file():
                print(f"{run.name}: no committed run to compare with")
                failures += 1
                continue
            compared, diffs = compare(run / "metrics.jsonl", committed)
            total += compared
            print(f"{run.name}: {compared} values, " + ("equal" if not diffs else f"{len(diffs)} differ"))
            for line in diffs[:8]:
                print(f"    {line}")
            failures += bool(diffs)
        if studies == ["all"]:
            missing = sorted({p.name for p in COMMITTED.glob("*-seed0")} - {p.name for p in replayed})
            for name in missing:
                print(f"{name}: committed, but no study replays it")
            failures += len(missing)
        print(f"golden steps: {len(replayed)} runs, {total} values compared over {args.steps} steps in "
              f"{time.perf_counter() - started:.0f} s: "
              + ("all equal to the committed metrics" if not failures else f"{failures} runs differ"))
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
