"""A run folder's lineage, walked through with the real CLI: train, roll back, rerun, kill while saving, rerun,
start over by mistake. After each command it prints what the folder holds, what `latest` names and each
checkpoint's parent, as the markdown table docs/reliability.md shows.

    python scripts/lineage_walkthrough.py > walkthrough.md      # about a minute on 2 CPU cores

Everything is written to a temporary folder (the debug preset on the bundled Shakespeare); paths are printed
as RUN/... so that the output is the same on every machine.
"""

from __future__ import annotations

import json
import lzma
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tlm(*args: str, fault: str = "", cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TLM_FAULT": fault,
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "tlm", *args], cwd=cwd, env=env, capture_output=True, text=True)
    return result.returncode, result.stderr


def folder_state(run: Path) -> tuple[str, str, str]:
    """(checkpoints with their parents, abandoned ones, what latest names)."""
    root = run / "checkpoints"

    def describe(path: Path) -> str:
        if not (path / "COMPLETE").is_file():
            return f"{path.name[5:].lstrip('0')} (incomplete)"
        lineage = json.loads((path / "trainer.json").read_text()).get("lineage") or {}
        parent = (lineage.get("parent_name") or "-").replace("step-", "").lstrip("0") or "-"
        return f"{path.name[5:].lstrip('0')} <- {parent}"

    here = ", ".join(describe(p) for p in sorted(root.glob("step-*")))
    away = ", ".join(f"{k.name}/" + describe(p) for k in sorted((root / "abandoned").glob("*"))
                     for p in sorted(k.glob("step-*")))
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else "-"
    return here or "-", away or "-", latest.replace("step-", "").lstrip("0")


def said(err: str, work: Path) -> str:
    """The lines of a command's log worth showing: where it resumed, what moved, why it stopped."""
    keep = ("resumed from", "rollback", "switch", "stopped at", "already at", "tlm: error", "not loadable",
            "skipped checkpoints", "interrupted", "killed")
    lines = [line for line in err.splitlines() if any(k in line for k in keep)]
    return "<br>".join(line.replace(str(work) + "/", "").replace("`", "'") for line in lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        speeches = [p for p in lzma.open(REPO / "data_pipeline" / "corpora" / "tinyshakespeare.txt.xz", "rt",
                                         encoding="utf-8").read().split("\n\n") if p.strip()]
        (work / "speeches.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in speeches))
        for args in (("tokenizer", "--out", "tok", "--data", "speeches.jsonl", "--vocab_size", "1000"),
                     ("prepare", "--out", "data", "--data", "speeches.jsonl", "--tokenizer", "tok", "--seq_len", "64")):
            status, err = tlm(*args, cwd=work)
            assert status == 0, err
        base = ("train", "--config", str(REPO / "configs" / "debug.yaml"), "--data.prepared=data",
                "--logging.run_dir=RUN", "--logging.wandb=disabled", "--logging.sample_prompt=null")
        lr = ("--optim.lr=2e-3",)
        steps = [
            ("train 8 steps (a checkpoint every 4, keep_last 2)", (), ""),
            ("roll back to step 4 with another lr, stop at 6",
             ("--checkpoint.resume=RUN/checkpoints/step-00000004", *lr, "--checkpoint.allow_change=optim.lr",
              "--train.stop_at=6"), ""),
            ("plain rerun, killed while writing checkpoint 8", lr, "kill_in_save@8"),
            ("plain rerun", lr, ""),
            ("start over in the same folder by mistake", ("--checkpoint.resume=none",), ""),
            ("switch back to the abandoned step 8", ("--checkpoint.resume=RUN/checkpoints/abandoned/1/step-00000008",),
             ""),
        ]
        print("| # | command (`tlm train --config debug ...`) | exit | checkpoints/ (step <- parent) | abandoned/ | "
              "latest | what tlm said |")
        print("|---|---|---|---|---|---|---|")
        for i, (what, args, fault) in enumerate(steps, 1):
            status, err = tlm(*base, *args, fault=fault, cwd=work)
            here, away, latest = folder_state(work / "RUN")
            flags = " ".join(args).replace(" --", "<br>--") or "(no flags)"
            print(f"| {i} | {what}:<br>`{flags}`" + (f"<br>TLM_FAULT={fault}" if fault else "") +
                  f" | {status} | {here} | {away} | {latest} | {said(err, work)} |")


if __name__ == "__main__":
    main()
