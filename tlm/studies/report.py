"""The ablation report: read every run's files, apply the decision rules, draw, and write report.md.

Everything in the report is computed from files: each run's `metrics.jsonl` and `summary.json`, its
`analysis.json` (tlm.studies.analysis: computed from the run's model the first time, then kept) and the
study's `unigram.json`, so that a copy of these small files, committed beside the report, regenerates it
exactly (tests/test_ablate.py checks the committed one).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from tlm.studies.catalogue import POSITION_PROBE_R2, UNIGRAM, Study, base_config_path, planned_runs, slug, studies
from tlm.studies.analysis import EVAL_NOISE, analyse, eval_noise
from tlm.studies.plots import plot_position, plot_study, plot_yarn
from tlm.studies.verdicts import cell, compare, targets, tokens_to_target, verdict
from tlm.model.generate import kv_cache_bytes
from tlm.training.metrics import line_of_descent, read_metrics, read_summary
from tlm.studies.stats import mean, std
from tlm.training.config import load_config

KEPT = ("metrics.jsonl", "summary.json", "analysis.json")


def load_run(run_dir: Path) -> dict[str, Any] | None:
    """The logged records and summary of a run (None when it has not finished)."""
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        return None
    # A run that was interrupted and trained again logs steps twice: the run as it stands (line_of_descent)
    records = line_of_descent(read_metrics(run_dir / "metrics.jsonl"))
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    summary = read_summary(summary_file)
    return {"dir": run_dir, "summary": summary, "train": train, "val": val, "seed": _seed(run_dir),
            "final_val": val[-1]["val_loss"] if val else math.nan, "final_se": val[-1].get("val_loss_se") if val else None}


def _seed(run_dir: Path) -> int:
    """The seed of a run folder named NAME-seedN."""
    return int(run_dir.name.rsplit("-seed", 1)[1]) if "-seed" in run_dir.name else 0


def _variant_runs(study: Study, runs_dir: Path, seeds: int) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name, overrides in study.variants.items():
        runs = [load_run(runs_dir / f"{slug(overrides)}-seed{s}") for s in range(seeds)]
        out[name] = [r for r in runs if r is not None]
    return out


def write_report(runs_dir: Path, report_dir: Path, scale: str, seeds: int, names: list[str]) -> Path:
    """Compute, draw and write report.md for the studies in `names`; copies the runs' small files along."""
    base = load_config(base_config_path(scale))
    known = studies(base)
    report_dir.mkdir(parents=True, exist_ok=True)
    unigram = _unigram(runs_dir.parent, report_dir)
    groups_of = {name: _variant_runs(known[name], runs_dir, seeds) for name in names}
    every = {run["dir"].name: run for groups in groups_of.values() for runs in groups.values() for run in runs}
    lines = [f"# Ablation studies ({scale} scale, up to {seeds} seeds)", "",
             f"Regenerate from the files kept beside this report: `tlm ablate report --scale {scale} --seeds {seeds} "
             f"--out docs/ablations/{scale} --report docs/ablations/{scale}`. Differences are final validation loss "
             "(nats) of a variant minus the baseline's, with a 95% confidence interval (paired t over seeds: a seed "
             "fixes the initial weights and the data order). Each study states its decision rule, fixed before "
             "these runs.", ""]
    noise = _eval_noise(runs_dir.parent, report_dir, scale, every)
    lines += _overview(base, every, len(_planned(names, scale, seeds)), unigram, noise)
    for name in names:
        study, groups = known[name], groups_of[name]
        need = study.kind in ("yarn", "equivalent") or name == "position"
        analyses = {v: [analyse(r["dir"], base.data.seq_len) for r in rs] if need else [] for v, rs in groups.items()}
        lines += [f"## {study.title}", "", f"Claim: {study.claim}.", "", f"Decision rule: {study.rule}.", ""]
        if not any(groups.values()):
            lines += ["No runs yet.", ""]
            continue
        label, evidence = verdict(study, groups, analyses, unigram["unigram_loss"] if unigram else None)
        lines += [f"**Verdict: {label}.** " + evidence[0] + ("" if len(evidence) == 1 else ":"), ""]
        lines += [f"- {line}" for line in evidence[1:]] + ([""] if len(evidence) > 1 else [])
        lines += _table(study, groups, base, analyses, unigram)
        if study.kind != "yarn":
            plot_study(study, groups, report_dir / f"{name}.png", scale)
            lines += [f"![{study.title}]({name}.png)", ""]
        if name == "position" and any(analyses.values()):
            plot_position(analyses, report_dir / "position_loss.png")
            lines += _probe_table(analyses) + ["![loss by position](position_loss.png)", ""]
        if name == "mlp":
            lines += _parameter_note(study, base)
        if study.kind == "target":
            lines += target_table(study, groups)
        if name == "yarn" and analyses.get(study.baseline):
            plot_yarn(analyses[study.baseline], report_dir / "yarn.png")
            lines += _yarn_table(analyses[study.baseline]) + ["![YaRN](yarn.png)", ""]
    for run in every.values():
        target = report_dir / "runs" / run["dir"].name
        if run["dir"].resolve() != target.resolve():
            target.mkdir(parents=True, exist_ok=True)
            for file in KEPT:
                if (run["dir"] / file).is_file():
                    shutil.copyfile(run["dir"] / file, target / file)
    path = report_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _eval_noise(out_dir: Path, report_dir: Path, scale: str, runs: dict[str, dict]) -> dict[str, Any] | None:
    """eval_noise.json (tlm.studies.analysis.eval_noise of two baseline seeds), computed once while their models
    exist, then kept beside the report."""
    data = _kept(EVAL_NOISE, out_dir, report_dir)
    if data is not None:
        return data
    pair = [runs[name]["dir"] for name in ("base-seed0", "base-seed1") if name in runs]
    if len(pair) < 2 or not all((run / "checkpoints").is_dir() for run in pair):
        return None
    from tlm_base.fileio import atomic_write_json
    from tlm.training.data import resolve_data

    prepared, _ = resolve_data(load_config(base_config_path(scale)), True)
    data = eval_noise(pair[0], pair[1], prepared)
    for folder in (out_dir, report_dir):
        atomic_write_json(folder / EVAL_NOISE, data)
    return data


def _kept(name: str, out_dir: Path, report_dir: Path) -> dict[str, Any] | None:
    """A study-wide JSON file (from the runs' folder, else the report's), copied beside the report; None if absent."""
    import json

    for folder in (out_dir, report_dir):
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text())
            if folder != report_dir:
                shutil.copyfile(folder / name, report_dir / name)
            return data
    return None


def _unigram(out_dir: Path, report_dir: Path) -> dict[str, Any] | None:
    """unigram.json of the study, copied beside the report."""
    return _kept(UNIGRAM, out_dir, report_dir)


def _planned(names: list[str], scale: str, seeds: int) -> list[dict[str, Any]]:
    return planned_runs(names, scale, seeds)


def _overview(base, runs: dict[str, dict], planned: int, unigram: dict | None, noise: dict | None) -> list[str]:
    """Compute, tokens, and how evaluation noise compares with seed noise."""
    if not runs:
        return [f"No runs yet ({planned} planned).", ""]
    # The process's CPU time where recorded; else wall time x threads (equal on a machine with a core per thread).
    seconds = sum(r["summary"].get("cpu_seconds") or r["summary"].get("wall_seconds", 0) * r["summary"].get("threads", 1)
                  for r in runs.values())
    tokens = sorted({r["summary"]["tokens_seen"] for r in runs.values()})
    evaluated = sorted({r["val"][-1]["val_tokens"] for r in runs.values() if r["val"] and r["val"][-1].get("val_tokens")})
    ses = [r["final_se"] for r in runs.values() if r["final_se"] is not None]
    baseline = [r["final_val"] for name, r in runs.items() if name.startswith("base-seed")]
    lines = [f"Runs: {len(runs)} of the {planned} planned; compute {seconds / 3600:.2f} core-hours (a run's CPU time, "
             "or wall time x threads before CPU time was recorded; summed over runs); tokens per run: "
             f"{', '.join(f'{t / 1e6:.2f}M' for t in tokens)}.", ""]
    if ses and len(baseline) > 1:
        lines += [f"Final validation loss over {', '.join(f'{t:,}' for t in evaluated)} held-out tokens. Its standard "
                  f"error across evaluation batches, {mean(ses):.4f} nats on average, measures how well these tokens "
                  "stand for the books' text in general; it is the same for every variant, because every run is "
                  f"evaluated on the same tokens. Against the {std(baseline):.4f} nats standard deviation across the "
                  f"baseline's {len(baseline)} seeds, what matters is the noise of a paired comparison:"
                  + (f" {noise['se_of_paired_difference']:.5f} nats, the standard error of the per-batch difference "
                     f"between {noise['runs'][0]} and {noise['runs'][1]} over {noise['batches']} batches "
                     f"({noise['tokens']:,} tokens; a lower bound, neighbouring batches are correlated), "
                     f"{std(baseline) / max(noise['se_of_paired_difference'], 1e-12):.0f}x below the seed noise."
                     if noise else " not measured (eval_noise.json is missing)."), ""]
    if unigram:
        lines += [f"Unigram loss of the validation split (every token predicted by its training frequency): "
                  f"{unigram['unigram_loss']:.4f} nats.", ""]
    if unigram and unigram.get("val_bytes"):
        per_token = unigram["val_bytes"] / unigram["val_tokens"]
        lines += [f"Bits per byte (comparable across tokenizers): the loss of the evaluated tokens over the UTF-8 bytes "
                  f"of their text, in bits. The validation split's {unigram['val_tokens']:,} target tokens are "
                  f"{unigram['val_bytes']:,} bytes ({per_token:.3f} per token), so over the whole split bits per byte "
                  f"= loss / {math.log(2) * per_token:.4f}.", ""]
    return lines


def target_table(study: Study, groups: dict[str, list[dict]]) -> list[str]:
    """Time to target per variant: tokens and CPU seconds to reach the baseline's final loss (per seed, on the curve's
    measure), as a mean over the seeds that reach it; CPU seconds = the run's CPU seconds per token x those tokens."""
    goal = targets(groups.get(study.baseline, []))
    rows = ["Time to target: tokens (and CPU seconds, one thread) until the validation curve reaches the AdamW "
            "baseline's final loss of the same seed (mean over the seeds that reach it):", "",
            "| variant | seeds reaching | tokens to target | x AdamW's | CPU seconds to target | final val loss (mean) |",
            "|---|---|---|---|---|---|"]
    ends = [r["summary"]["tokens_seen"] for r in groups.get(study.baseline, [])]
    for variant, runs in groups.items():
        runs = [r for r in runs if r["seed"] in goal]
        if not runs or not ends:
            continue
        reached = [(r, t) for r in runs for t in [tokens_to_target(r, goal[r["seed"]])] if t is not None]
        tokens = mean([t for _, t in reached]) if reached else math.nan
        cpu = [r["summary"]["cpu_seconds"] * t / r["summary"]["tokens_seen"] for r, t in reached
               if r["summary"].get("cpu_seconds")]
        seconds = mean(cpu) if cpu else math.nan
        shown = (f"{tokens / 1e6:.3f}M | {tokens / mean(ends):.2f} | {seconds:.0f}" if reached else "- | - | -")
        rows.append(f"| {variant} | {len(reached)} of {len(runs)} | {shown} | {mean([r['final_val'] for r in runs]):.4f} |")
    return rows + [""]


def _probe_table(analyses: dict[str, list[dict]]) -> list[str]:

    layers = max(len(a["position_probe_layers"]) for items in analyses.values() for a in items)
    rows = [f"Where is position? R^2 of a linear (ridge) probe predicting the absolute position from each layer's "
            f"hidden states, on held-out windows (mean over seeds; a model infers position when some layer reaches "
            f"{POSITION_PROBE_R2}):", "",
            "| model | embeddings | " + " | ".join(f"after layer {i}" for i in range(1, layers)) + " | infers position |",
            "|---|" + "---|" * (layers + 1)]
    for variant, items in analyses.items():
        if not items:
            continue
        r2 = [mean([a["position_probe_layers"][i] for a in items]) for i in range(layers)]
        rows.append(f"| {variant} | " + " | ".join(f"{x:.3f}" for x in r2) +
                    f" | {'yes' if max(r2) >= POSITION_PROBE_R2 else 'no'} (best {max(r2):.3f}) |")
    return rows + [""]


def _parameter_note(study: Study, base) -> list[str]:
    counts = {v: _parameters(base, overrides) for v, overrides in study.variants.items()}
    names = list(counts)
    a, b = counts[names[0]], counts[names[1]]
    return [f"Parameters: {names[0]} {a:,}, {names[1]} {b:,} ({names[1]} has {b - a:+,}, {100 * (b - a) / a:+.1f}%): "
            "the two-matrix SiLU MLP at 4 x hidden is not matched exactly to SwiGLU's three matrices at 8/3 x hidden "
            "rounded up to a multiple of 64.", ""]


def _parameters(base, overrides: dict[str, Any]) -> int:
    from tlm.model.transformer import TransformerLM

    config = load_config(base_config_path_for(base), dict(overrides)).model
    with torch.device("meta"):
        return TransformerLM(config).num_parameters()


def final_bpb(run: dict[str, Any], unigram: dict[str, Any] | None) -> float | None:
    """A run's final bits per byte: as logged, else (runs that predate its logging) from its final loss and the
    bytes of the validation split in unigram.json, when that evaluation covered the whole split."""
    last = run["val"][-1] if run["val"] else {}
    if last.get("val_bpb") is not None:
        return last["val_bpb"]
    if unigram and unigram.get("val_bytes") and last.get("val_tokens") == unigram["val_tokens"]:
        return last["val_loss"] * last["val_tokens"] / (math.log(2) * unigram["val_bytes"])
    return None


def _table(study: Study, groups: dict[str, list[dict]], base, analyses: dict[str, list[dict]],
           unigram: dict[str, Any] | None) -> list[str]:
    kv = study.kind == "equivalent"
    rows = ["| variant | seeds | final val loss (mean +- std) | bits per byte | diff to baseline [95% CI] | parameters |" +
            (" KV cache @512 / @4096 (bf16, batch 1) | decode tokens/s @4096 (CPU) |" if kv else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if kv else "")]
    baseline = groups.get(study.baseline, [])
    for variant, runs in groups.items():
        overrides = study.variants[variant]
        config = load_config(base_config_path_for(base), dict(overrides)).model
        finals = [r["final_val"] for r in runs]
        loss = f"{mean(finals):.4f} +- {std(finals):.4f}" if finals else "-"
        diff = "baseline" if variant == study.baseline else (cell(compare(baseline, runs)) if runs and baseline else "-")
        bpbs = [b for b in (final_bpb(r, unigram) for r in runs) if b is not None]
        bpb = f"{mean(bpbs):.4f}" if bpbs and len(bpbs) == len(runs) else "-"
        row = f"| {variant} | {len(runs)} | {loss} | {bpb} | {diff} | {_parameters(base, overrides):,} |"
        if kv:
            speeds = [a["decode"]["tokens_per_s"] for a in analyses.get(variant, []) if a.get("decode")]
            row += (f" {kv_cache_bytes(config, 1, 512) / 2**20:.2f} MiB / {kv_cache_bytes(config, 1, 4096) / 2**20:.2f} MiB"
                    f" | {f'{mean(speeds):.0f}' if speeds else '-'} |")
        rows.append(row)
    return rows + [""]


def base_config_path_for(base) -> Path:
    """The recipe file a loaded base config came from (its name is the scale)."""
    return base_config_path(base.name)


def _yarn_table(analyses: list[dict]) -> list[str]:
    rows = ["| context | x trained | windows (all seeds) | perplexity, RoPE as trained | perplexity, YaRN "
            "(factor = context / trained) |", "|---|---|---|---|---|"]
    trained = analyses[0]["seq_len"]
    lengths = sorted({row["length"] for a in analyses for row in a["long_context"]})
    for n in lengths:
        items = [row for a in analyses for row in a["long_context"] if row["length"] == n]
        plain = mean([math.exp(r["plain"]) for r in items])
        yarn = mean([math.exp(r["yarn"]) for r in items])
        rows.append(f"| {n} | {n // trained} | {sum(r['windows'] for r in items)} | {plain:.1f} | {yarn:.1f} |")
    return rows + [""]
