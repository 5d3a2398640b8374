"""The ablation runner: trains the runs a set of studies needs (tlm.studies.catalogue), here or as a Slurm
array, then writes the report (tlm.studies.report).

    tlm ablate STUDY [--scale cpu|h200] [--seeds 2] [--out runs/ablations/cpu] [--slurm]
    tlm ablate report [--out ...] [--report docs/ablations]

Runs are named by their overrides (`base`, `lr=0.0006`, `norm=none`, ...) plus the seed, so a setting shared
by several studies (every study's baseline is the base recipe) is trained once. A run whose summary says
complete is not trained again; an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from tlm_base.errors import ConfigError
from tlm.studies.catalogue import CONFIG_DIR, UNIGRAM, base_config_path, planned_runs, resolve_studies
from tlm.studies.report import write_report
from tlm.training.config import load_config

log = logging.getLogger("tlm")


def is_complete(run_dir: Path) -> bool:
    from tlm.training.metrics import read_summary

    summary = run_dir / "summary.json"
    return summary.is_file() and read_summary(summary)["complete"]




def unigram_reference(scale: str, out: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """OUT/unigram.json: the loss of predicting every validation token by its training-set frequency (add-one
    smoothed): the plateau a model that ignores its context sits on, for the stability rule; and the UTF-8 bytes
    of the validation targets' text (for bits per byte of runs that predate its logging). Computed once from
    the base recipe's prepared data and kept with the runs."""
    import json

    import numpy as np

    from data_pipeline.dataset import TokenRows
    from tlm_base.fileio import atomic_write_json
    from tlm.training.data import resolve_data

    path = out / UNIGRAM
    known = json.loads(path.read_text()) if path.is_file() else None
    if known is not None and "val_bytes" in known:
        return known
    config = load_config(base_config_path(scale), extra)
    prepared, tokenizer_dir = resolve_data(config, True)
    vocab = config.model.vocab_size

    def targets(split: str):
        rows = TokenRows(prepared, split, verify="size")
        for start in range(0, len(rows), 4096):
            block, _ = rows.gather(np.arange(start, min(start + 4096, len(rows))))
            yield block[:, 1:].reshape(-1)

    from tlm.training.evaluate import byte_table

    token_bytes = byte_table(tokenizer_dir, vocab)
    val_bytes = int(sum(int(token_bytes[ids].sum()) for ids in targets("val")))
    if known is not None:  # written before bytes were counted: add them
        atomic_write_json(path, {**known, "val_bytes": val_bytes})
        return {**known, "val_bytes": val_bytes}
    counts = np.zeros(vocab, dtype=np.int64)
    for ids in targets("train"):
        counts += np.bincount(ids, minlength=vocab)
    logp = np.log(counts + 1) - np.log(counts.sum() + vocab)
    total, tokens = 0.0, 0
    for ids in targets("val"):
        total -= float(logp[ids].sum())
        tokens += len(ids)
    result = {"unigram_loss": total / tokens, "train_tokens": int(counts.sum()), "val_tokens": tokens,
              "vocab_size": vocab, "smoothing": "add-one", "val_bytes": val_bytes}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    return result


def run_local(runs: list[dict[str, Any]], scale: str, out: Path) -> list[str]:
    """Train each run in this process, one after another; skip the finished ones. Returns those trained.

    Each run is claimed with an advisory lock on OUT/runs/NAME/.lock, so several `tlm ablate` processes
    started on the same OUT share the work (one per core, say); the lock dies with its process, so a crash
    never leaves a run claimed.
    """
    from tlm_base.locks import FolderInUse, FolderLock
    from tlm.training.trainer import train

    trained = []
    for i, run in enumerate(runs, 1):
        run_dir = out / "runs" / run["name"]
        if is_complete(run_dir):
            log.info("[%d/%d] %s: already done", i, len(runs), run["name"])
            continue
        try:
            lock = FolderLock(run_dir, "run folder").acquire()  # the trainer takes it again: same process, no conflict
        except FolderInUse:
            log.info("[%d/%d] %s: another process is training it", i, len(runs), run["name"])
            continue
        try:
            if is_complete(run_dir):  # finished while we looked
                continue
            log.info("[%d/%d] %s: training (%s)", i, len(runs), run["name"], run["overrides"] or "base recipe")
            config = load_config(base_config_path(scale), {**run["overrides"], "name": run["name"],
                                                          "logging.run_dir": str(run_dir)})
            train(config)
        finally:
            lock.release()
        trained.append(run["name"])
    return trained


def submit_slurm(runs: list[dict[str, Any]], scale: str, out: Path, sbatch_args: str = "") -> str:
    """One array task per unfinished run, through slurm/ablate.sbatch; returns the job id."""
    todo = [r for r in runs if not is_complete(out / "runs" / r["name"])]
    if not todo:
        return ""
    out.mkdir(parents=True, exist_ok=True)
    variants = out / "variants.txt"
    lines = []
    for run in todo:
        flags = [f"--{k}={v}" for k, v in run["overrides"].items()] + [f"--logging.run_dir={out / 'runs' / run['name']}"]
        lines.append(f"{run['name']} {' '.join(flags)}")
    variants.write_text("\n".join(lines) + "\n")
    repo = CONFIG_DIR.parent.parent
    env = {"TLM_VARIANTS": str(variants), "TLM_CONFIG": str(base_config_path(scale)), "TLM_HOME": str(repo)}
    import os

    command = ["sbatch", "--parsable", f"--array=0-{len(todo) - 1}", *sbatch_args.split(), str(repo / "slurm" / "ablate.sbatch")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, cwd=out)
    if result.returncode != 0:
        raise ConfigError(f"sbatch failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def run_studies(study: str, scale: str = "cpu", seeds: int = 3, out: str | None = None, report: str | None = None,
                slurm: bool = False, sbatch_args: str = "", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`tlm ablate`: train what the studies still need (here, or as a Slurm job array), then write the report."""

    out_dir = Path(out or f"runs/ablations/{scale}")
    report_dir = Path(report) if report else out_dir / "report"
    names = resolve_studies("all" if study == "report" else study)
    trained: list[str] = []
    if study != "report":
        runs = planned_runs(names, scale, seeds, overrides)
        if "norm_position" in names:
            unigram_reference(scale, out_dir, overrides)
        if slurm:
            job = submit_slurm(runs, scale, out_dir, sbatch_args)
            log.info("submitted job array %s (%d runs); then: tlm ablate report --scale %s --out %s", job or "-",
                     len(runs), scale, out_dir)
            return {"job": job, "runs": [r["name"] for r in runs]}
        trained = run_local(runs, scale, out_dir)
        log.info("trained %d of %d runs", len(trained), len(runs))
    path = write_report(out_dir / "runs", report_dir, scale, seeds, names)
    log.info("report: %s", path)
    return {"report": str(path), "studies": names, "trained": trained}
