"""The ablation studies: each variant is a config override of one base recipe, run for N seeds.

    tlm ablate STUDY [--scale cpu|h200] [--seeds 2] [--out runs/ablations/cpu] [--slurm]
    tlm ablate report [--out ...] [--report docs/ablations]

Runs are named by their overrides (`base`, `lr=0.0006`, `norm=none`, ...) plus the seed, so a setting shared
by several studies (every study's baseline is the base recipe) is trained once. A run whose summary says
complete is not trained again; an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlm_base.errors import ConfigError
from tlm.training.config import TrainConfig, load_config

log = logging.getLogger("tlm")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "ablations"
SCALES = ("cpu", "h200")
LR_MULTIPLIERS = (0.2, 0.5, 1, 2, 5)
STABILITY_MULTIPLIERS = (0.2, 1, 5)
BATCH_MULTIPLIERS = (0.5, 1, 2)
KV_HEADS = (1, 2, 4, 8)
# The decision rules, fixed before the runs they judge (each is printed under its study in the report).
EQUIVALENCE_MARGIN = 0.05  # nats of validation loss: "no loss in perplexity" means within this (~5% perplexity)
TRAINS_MARGIN = 0.5  # nats: a run "trains" when its final validation loss is this far below the unigram loss
POSITION_PROBE_R2 = 0.5  # a model "infers position" when a linear probe of some layer reaches this held-out R^2
YARN_FACTORS = (2, 4, 8, 16)  # long-context evaluation at these multiples of the trained length

RULES = {
    "better": "the variant minus the baseline, paired over seeds: reproduced when the 95% CI of the difference in "
              "final validation loss lies above 0, not reproduced when below 0, inconclusive when it contains 0",
    "sweep": "for every other grid point, its final validation loss minus the baseline's, paired over seeds: reproduced "
             "when every 95% CI lies above 0 (the baseline beats each), not reproduced when some CI lies below 0 (a "
             "grid point beats it), inconclusive otherwise",
    "equivalent": f"two one-sided tests (TOST, 5% each) of each KV-head count against the baseline's: the 90% CI of the "
                  f"paired difference inside +-{EQUIVALENCE_MARGIN} nats is equivalent, entirely above "
                  f"+{EQUIVALENCE_MARGIN} is worse, entirely below -{EQUIVALENCE_MARGIN} better; reproduced when none is "
                  "worse or undecided, not reproduced when one is worse, inconclusive otherwise",
    "stability": f"a run trains when its final validation loss is finite and at least {TRAINS_MARGIN} nats below the "
                 "unigram loss of the validation split (predicting every token by its training frequency; a stalled "
                 "run sits on it); for pre- and post-norm, the highest rate of the grid at which every seed trains; "
                 "reproduced when pre-norm's is at least 5x post-norm's, not reproduced when lower, inconclusive when "
                 "either trains at no rate",
    "yarn": f"at each of {', '.join(f'{f}x' for f in YARN_FACTORS)} the trained length (YaRN factor = that multiple), "
            "YaRN's loss minus plain RoPE's, paired over seeds: reproduced when every 95% CI lies below 0, not "
            "reproduced when one lies above 0, inconclusive otherwise",
}


@dataclass
class Study:
    """A claim and the variants that test it. kind: sweep | better | equivalent | stability | yarn."""

    name: str
    title: str
    claim: str
    kind: str
    baseline: str
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def rule(self) -> str:
        return RULES[self.kind]


def _number(value: float) -> str:
    return f"{value:.6g}"


def studies(base: TrainConfig) -> dict[str, Study]:
    """The studies, their variants derived from the base recipe."""
    lr = base.optim.lr
    batch = base.global_batch_size(1)
    steps = base.train.max_steps
    heads = base.model_config().num_attention_heads
    lr_variants = {f"lr={_number(lr * m)}": ({} if m == 1 else {"optim.lr": lr * m}) for m in LR_MULTIPLIERS}
    batch_variants = {}
    for m in BATCH_MULTIPLIERS:
        size = int(batch * m)
        overrides = {} if m == 1 else {"batch.global_batch_size": size, "batch.micro_batch_size": min(size, base.batch.micro_batch_size)}
        if m != 1 and steps:
            overrides["train.max_steps"] = int(round(steps / m))  # the same number of tokens
        batch_variants[f"batch={size}"] = overrides
    stability = {}
    for position in ("pre", "post"):
        for m in STABILITY_MULTIPLIERS:
            overrides = {} if m == 1 else {"optim.lr": lr * m}
            if position == "post":
                overrides = {"model.norm_position": "post", **overrides}
            stability[f"{position} lr={_number(lr * m)}"] = overrides
    kv = {f"kv_heads={k}": ({} if k == base.model_config().num_key_value_heads else {"model.num_key_value_heads": k})
          for k in KV_HEADS if heads % k == 0 and k <= heads}
    return {
        "lr": Study("lr", "1. Learning rate", "no learning rate of the sweep beats the baseline's", "sweep",
                    f"lr={_number(lr)}", lr_variants),
        "batch": Study("batch", "2. Batch size", "no batch size of the sweep beats the baseline's at equal tokens",
                       "sweep", f"batch={batch}", batch_variants),
        "norm": Study("norm", "3. RMSNorm vs no normalisation",
                      "RMSNorm converges to a lower loss than no normalisation", "better", "rmsnorm",
                      {"rmsnorm": {}, "none": {"model.norm": "none"}}),
        "norm_position": Study("norm_position", "4. Pre-norm vs post-norm",
                               "post-norm needs a ~5x lower learning rate to train stably; pre-norm allows the higher rate",
                               "stability", f"pre lr={_number(lr)}", stability),
        "position": Study("position", "5. NoPE vs RoPE", "RoPE converges to a lower loss than NoPE "
                          "(and a NoPE model still infers position)", "better", "rope",
                          {"rope": {}, "nope": {"model.position_embedding": "nope"}}),
        "mlp": Study("mlp", "6. SwiGLU vs SiLU", "SwiGLU converges to a lower loss than a SiLU MLP of about the same size",
                     "better", "swiglu", {"swiglu": {}, "silu": {"model.mlp": "silu"}}),
        "kv_heads": Study("kv_heads", "7. KV heads (GQA)",
                          f"fewer KV heads cut KV-cache memory up to {heads}x with no loss in perplexity "
                          f"(within {EQUIVALENCE_MARGIN} nats of {heads} heads)", "equivalent",
                          f"kv_heads={heads}", kv),
        "yarn": Study("yarn", "8. YaRN at inference",
                      "YaRN lets a model trained at the base length keep its perplexity at 2-16x that length "
                      "(the original uses factor 16)",
                      "yarn", "base", {"base": {}}),
        "documents": Study("documents", "9. Document masking",
                           "attention across document boundaries inside a packed row hurts: a model that attends only "
                           "within each document (train.document_masking=mask, evaluated the same way) converges "
                           "to a lower loss", "better", "mask",
                           {"mask": {"train.document_masking": "mask"}, "cross-document": {}}),
    }


def slug(overrides: dict[str, Any]) -> str:
    """A run name from the overrides: `base`, or `key=value-key=value` (last part of each key)."""
    if not overrides:
        return "base"
    return "-".join(f"{k.split('.')[-1]}={_number(v) if isinstance(v, float) else v}" for k, v in sorted(overrides.items()))


def base_config_path(scale: str) -> Path:
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {SCALES}, got {scale!r}")
    return CONFIG_DIR / f"{scale}.yaml"


def plan(names: list[str], scale: str, seeds: int, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every distinct (overrides, seed) the chosen studies need, in order."""
    base = load_config(base_config_path(scale), extra)
    known = studies(base)
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        for overrides in known[name].variants.values():
            for seed in range(seeds):
                run = f"{slug(overrides)}-seed{seed}"
                runs.setdefault(run, {"name": run, "overrides": {**(extra or {}), **overrides, "train.seed": seed}})
    return list(runs.values())


def resolve_studies(study: str) -> list[str]:
    names = list(studies(load_config(base_config_path("cpu"))))
    if study == "all":
        return names
    if study not in names:
        raise ConfigError(f"unknown study '{study}'; studies: {', '.join(names)}, all, report")
    return [study]


def is_complete(run_dir: Path) -> bool:
    from tlm.training.metrics import read_summary

    summary = run_dir / "summary.json"
    return summary.is_file() and read_summary(summary)["complete"]


UNIGRAM = "unigram.json"


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
    vocab = config.model_config().vocab_size

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
    from tlm.studies.report import write_report

    out_dir = Path(out or f"runs/ablations/{scale}")
    report_dir = Path(report) if report else out_dir / "report"
    names = resolve_studies("all" if study == "report" else study)
    trained: list[str] = []
    if study != "report":
        runs = plan(names, scale, seeds, overrides)
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
