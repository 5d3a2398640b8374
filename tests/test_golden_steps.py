"""Golden steps (issue 21): a change that alters a committed ablation run's numbers fails here.

The committed CPU runs (docs/ablations/cpu/runs) drifted from the code once without anything failing: 15 of them
had trained uncompiled (torch.compile gave up after 8 recompilations in the sweep's one process) while the report
said torch.compile, and a fresh rerun of NoPE ended 0.005 nats away. scripts/golden_steps.py replays the first
steps of committed runs through `tlm ablate` and compares every deterministic logged value with the committed
metrics.jsonl, exactly (the step-0 validation loss, the loss, gradient norm and learning rate at steps 10, 20, ...).

CI replays one study's seed 0, the position study: the baseline (whose compiled graph the four learning rates and
the batch of 32 share; its step-0 validation covers the RoPE forward) and NoPE, 10 steps each, about a minute on
2 cores. Replaying all 23 variants takes ~9 minutes, over CI's budget: `python scripts/golden_steps.py` is the
check every change touching the model or the step runs (docs/ablations/README.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "golden_steps.py"
SKIP = 77  # the script's status where this machine cannot compute the committed bits (another torch or CPU)


@pytest.mark.slow
def test_the_committed_runs_first_steps_replay_bit_for_bit(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--studies", "position", "--steps", "10",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    if result.returncode == SKIP:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    for run in ("base-seed0", "position_embedding=nope-seed0"):  # both replayed, compared and equal
        assert any(line.startswith(f"{run}: ") and line.endswith(" values, equal") for line in lines), result.stdout


def test_a_difference_in_any_compared_value_is_reported(tmp_path: Path) -> None:
    """The comparison itself, without training: an exact copy is equal (the step-0 validation's 5 values and 6
    at each of steps 10, 20, 30); one ulp off in a loss, a step the committed run lacks or no step-0 validation
    is a difference."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import golden_steps
    finally:
        sys.path.remove(str(SCRIPT.parent))
    committed = REPO / "docs" / "ablations" / "cpu" / "runs" / "base-seed0" / "metrics.jsonl"
    lines = committed.read_text().splitlines()[:4]  # step 0 validation, steps 10, 20, 30
    copy = tmp_path / "copy.jsonl"
    copy.write_text("\n".join(lines) + "\n")
    compared, diffs = golden_steps.compare(copy, committed)
    assert diffs == [] and compared == 5 + 3 * 6

    records = [json.loads(line) for line in lines]
    records[2]["loss"] = math.nextafter(records[2]["loss"], math.inf)  # one ulp
    copy.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    compared, diffs = golden_steps.compare(copy, committed)
    assert compared == 5 + 3 * 6 and len(diffs) == 1 and diffs[0].startswith("step 20 loss: replayed"), diffs

    records = [json.loads(line) for line in lines[1:]] + [{"step": 1000, "loss": 1.0}]
    copy.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    _, diffs = golden_steps.compare(copy, committed)
    assert diffs == ["step 1000: the committed metrics have no record of it",
                     "the replay did not evaluate at step 0 (eval.at_start)"]
