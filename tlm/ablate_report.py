"""The ablation report: read every run's metrics, compute the statistics and analyses, draw, and write.

Everything in the report is computed from files: each run's `metrics.jsonl` and `summary.json`, and
`analysis.json` (loss by position, a position probe, long-context perplexity), which is computed from the
run's model the first time and kept, so that a copy of these small files regenerates the whole report.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tlm.ablate import EQUIVALENCE_MARGIN, Study, base_config_path, slug, studies
from tlm.errors import TLMError
from tlm.fileio import atomic_write_json
from tlm.generate import kv_cache_bytes
from tlm.metrics import read_metrics, read_summary
from tlm.schema import PosInt, Schema, load_json_text, parse
from tlm.stats import mean, paired_difference, std, welch_difference
from tlm.train_config import load_config
from tlm.train_state import read_latest

KEPT = ("metrics.jsonl", "summary.json", "analysis.json")


def load_run(run_dir: Path) -> dict[str, Any] | None:
    """The logged records and summary of a run (None when it has not finished)."""
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        return None
    records = read_metrics(run_dir / "metrics.jsonl")
    # A run that was interrupted and trained again logs its first steps twice: the last record of a step wins.
    train = sorted({r["step"]: r for r in records if "loss" in r}.values(), key=lambda r: r["step"])
    val = sorted({r["step"]: r for r in records if "val_loss" in r}.values(), key=lambda r: r["step"])
    return {"dir": run_dir, "summary": read_summary(summary_file), "train": train, "val": val,
            "final_val": val[-1]["val_loss"] if val else math.nan}


# --- analyses that need the trained model ----------------------------------------------------------------

def _latest_model(run_dir: Path) -> Path | None:
    latest = read_latest(run_dir)
    if latest is None:
        return None
    model = latest / "model"
    return model if model.is_dir() else None


def long_windows(model_dir: Path, length: int, count: int) -> torch.Tensor:
    """`count` windows of `length` + 1 tokens from the bundled held-out books (never across two books)."""
    import lzma

    from data_pipeline import DEMO_VAL
    from tlm.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    books = [json.loads(line)["text"] for line in lzma.open(DEMO_VAL, "rt", encoding="utf-8")]
    ids = [tok.encode(book).ids for book in books]
    windows = []
    while len(windows) < count:
        before = len(windows)
        for book in ids:
            start = (len(windows) // len(ids)) * (length + 1)
            if start + length + 1 <= len(book) and len(windows) < count:
                windows.append(book[start : start + length + 1])
        if len(windows) == before:
            break
    return torch.tensor(windows)


@torch.no_grad()
def _position_losses(model, windows: torch.Tensor) -> torch.Tensor:
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none").view(windows.shape[0], -1)


@torch.no_grad()
def position_probe(model, windows: torch.Tensor) -> float:
    """R^2 of a ridge regression from the last hidden states to the position index (held-out half)."""
    captured = {}
    hook = model.norm.register_forward_hook(lambda m, a, o: captured.setdefault("h", a[0]))
    model(windows[:, :-1])
    hook.remove()
    hidden = captured["h"].double()
    batch, seq, width = hidden.shape
    positions = torch.arange(seq, dtype=torch.float64).repeat(batch, 1)
    half = batch // 2
    x_train, y_train = hidden[:half].reshape(-1, width), positions[:half].reshape(-1)
    x_test, y_test = hidden[half:].reshape(-1, width), positions[half:].reshape(-1)
    mu, y_mu = x_train.mean(0), y_train.mean()
    xt = x_train - mu
    weights = torch.linalg.solve(xt.T @ xt + 1e-3 * torch.eye(width, dtype=torch.float64), xt.T @ (y_train - y_mu))
    predicted = (x_test - mu) @ weights + y_mu
    return float(1 - ((predicted - y_test) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum())


class LongContextRow(Schema):
    length: PosInt
    windows: PosInt
    plain: float
    yarn: float


class AnalysisFile(Schema):
    """analysis.json, as cached beside a run (kept with the report's evidence)."""

    seq_len: PosInt
    loss_by_position: list[float]
    position_probe_r2: float | None
    long_context: list[LongContextRow]


def analyse(run_dir: Path, seq_len: int, windows: int = 16) -> dict[str, Any]:
    """analysis.json of a run: loss by position and the position probe at its training length, and
    long-context perplexity at 1, 2, 4, 8 x that length with and without YaRN. Cached next to the run."""
    path = run_dir / "analysis.json"
    if path.is_file():
        fix = "delete it to compute it again from the run's model"
        data = load_json_text(path, TLMError, fix)
        parse(AnalysisFile, data, str(path), TLMError, fix)
        return data
    model_dir = _latest_model(run_dir)
    if model_dir is None:
        return {}
    from tlm.checkpoint import load_model_dir

    model = load_model_dir(model_dir)
    base = long_windows(model_dir, seq_len, windows * 2)
    result: dict[str, Any] = {"seq_len": seq_len, "loss_by_position": _position_losses(model, base).mean(0).tolist(),
                              "position_probe_r2": position_probe(model, base), "long_context": []}
    if model.config.position_embedding == "rope":
        for factor in (1, 2, 4, 8):
            length = seq_len * factor
            data = long_windows(model_dir, length, windows)
            if len(data) == 0:
                continue
            row = {"length": length, "windows": len(data), "plain": _position_losses(model, data).mean().item()}
            if factor > 1:
                yarn = load_model_dir(model_dir, rope_scaling={"factor": float(factor),
                                                               "original_max_position_embeddings": seq_len})
                row["yarn"] = _position_losses(yarn, data).mean().item()
            else:
                row["yarn"] = row["plain"]
            result["long_context"].append(row)
    atomic_write_json(path, result)
    return result


# --- statistics and verdicts -------------------------------------------------------------------------------

def _cell(d) -> str:
    return f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}]" if math.isfinite(d.low) else f"{d.estimate:+.4f} [n/a]"


def _variant_runs(study: Study, runs_dir: Path, seeds: int) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name, overrides in study.variants.items():
        runs = [load_run(runs_dir / f"{slug(overrides)}-seed{s}") for s in range(seeds)]
        out[name] = [r for r in runs if r is not None]
    return out


def _compare(base: list[dict], other: list[dict]):
    if not base or not other:
        from tlm.stats import Difference

        return Difference(math.nan, -math.inf, math.inf, 0.0)
    a = [r["final_val"] for r in base]
    b = [r["final_val"] for r in other]
    if len(a) == len(b) and len(a) > 1:
        return paired_difference(a, b)  # same seeds: same initial weights and data order
    return welch_difference(a, b)


def _stable(run: dict[str, Any], best_gain: float) -> bool:
    """Stable: every logged loss finite and at least half of the best run's improvement reached."""
    losses = [r["loss"] for r in run["train"]] + [r["val_loss"] for r in run["val"]]
    if not losses or not all(math.isfinite(x) for x in losses):
        return False
    start = run["val"][0]["val_loss"] if run["val"] else losses[0]
    return start - run["final_val"] >= 0.5 * best_gain


def verdict(study: Study, groups: dict[str, list[dict]], analyses: dict[str, list[dict]]) -> tuple[str, list[str]]:
    """('reproduced' | 'not reproduced' | 'inconclusive' | 'no data', lines of evidence)."""
    if not groups.get(study.baseline):
        return "no data", ["the baseline runs are missing"]
    base = groups[study.baseline]
    if study.kind == "better":
        other = [v for v in groups if v != study.baseline][0]
        if not groups[other]:
            return "no data", [f"the {other} runs are missing"]
        d = _compare(base, groups[other])
        label = "reproduced" if d.low > 0 else "not reproduced" if d.high < 0 else "inconclusive"
        return label, [f"{other} - {study.baseline}: {_cell(d)} nats of final validation loss (95% CI)"]
    if study.kind == "sweep":
        means = {v: mean([r["final_val"] for r in rs]) for v, rs in groups.items() if rs}
        best = min(means, key=means.get)
        if best == study.baseline:
            return "reproduced", [f"the baseline {study.baseline} has the lowest mean final validation loss"]
        d = _compare(base, groups[best])
        label = "not reproduced" if d.high < 0 else "inconclusive"
        return label, [f"best: {best}; {best} - {study.baseline}: {_cell(d)} nats (95% CI)"]
    if study.kind == "equivalent":
        lines, worst = [], "reproduced"
        for v, rs in groups.items():
            if v == study.baseline or not rs:
                continue
            d = _compare(base, rs)
            lines.append(f"{v} - {study.baseline}: {_cell(d)} nats (margin {EQUIVALENCE_MARGIN})")
            if d.low > EQUIVALENCE_MARGIN:
                worst = "not reproduced"
            elif d.high > EQUIVALENCE_MARGIN and worst == "reproduced":
                worst = "inconclusive"
        return worst, lines
    if study.kind == "stability":
        starts = [r["val"][0]["val_loss"] - r["final_val"] for rs in groups.values() for r in rs if r["val"]]
        best_gain = max(starts) if starts else 0.0
        highest = {}
        for position in ("pre", "post"):
            stable = [float(v.split("lr=")[1]) for v, rs in groups.items()
                      if v.startswith(position) and rs and all(_stable(r, best_gain) for r in rs)]
            highest[position] = max(stable) if stable else None
        pre, post = highest["pre"], highest["post"]
        lines = [f"highest stable learning rate: pre-norm {pre}, post-norm {post} (stable: finite losses and at least "
                 f"half of the best run's improvement, every seed)"]
        if pre is None or post is None:
            return ("not reproduced" if post is not None else "inconclusive"), lines
        ratio = pre / post
        lines.append(f"ratio pre / post = {ratio:.3g} on a grid of x{', x'.join(str(m) for m in (0.2, 1, 5))}")
        return ("reproduced" if ratio >= 5 else "not reproduced"), lines
    if study.kind == "yarn":
        rows = [row for a in analyses.get(study.baseline, []) for row in a.get("long_context", []) if row["length"] > a["seq_len"]]
        if not rows:
            return "no data", ["no long-context evaluation"]
        better = sum(row["yarn"] < row["plain"] for row in rows)
        label = "reproduced" if better == len(rows) else "not reproduced" if better == 0 else "inconclusive"
        return label, [f"YaRN has the lower loss in {better} of {len(rows)} (length, seed) evaluations beyond the training length"]
    raise ValueError(study.kind)


# --- figures and the report ------------------------------------------------------------------------------

def _curve(runs: list[dict], kind: str) -> tuple[list[float], list[float], list[float], list[float]]:
    key = "loss" if kind == "train" else "val_loss"
    series = [[(r["tokens_seen"], r[key]) for r in run[kind]] for run in runs]
    length = min(len(s) for s in series)
    xs = [series[0][i][0] for i in range(length)]
    ys = [[s[i][1] for s in series] for i in range(length)]
    return xs, [mean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def plot_study(study: Study, groups: dict[str, list[dict]], path: Path, scale: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind, label in ((axes[0], "train", "training loss"), (axes[1], "val", "validation loss")):
        for variant, runs in groups.items():
            if not runs or not runs[0][kind]:
                continue
            xs, ys, lo, hi = _curve(runs, kind)
            line, = ax.plot([x / 1e6 for x in xs], ys, label=f"{variant} ({len(runs)} seeds)",
                            linewidth=2.2 if variant == study.baseline else 1.4)
            ax.fill_between([x / 1e6 for x in xs], lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("tokens seen (millions)")
        ax.set_ylabel(f"{label} (nats)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        finite = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
        if finite:
            ax.set_ylim(min(finite) - 0.1, min(max(finite), min(finite) + 4))
        ax.legend(fontsize=8)
    fig.suptitle(f"{study.title} ({scale} scale; band: range across seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_position(analyses: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, items in analyses.items():
        curves = [a["loss_by_position"] for a in items if a.get("loss_by_position")]
        if curves:
            ax.plot([mean(c) for c in zip(*curves)], label=f"{variant} ({len(curves)} seeds)")
    ax.set_xlabel("position in the window")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("Loss by position in the window (mean over held-out windows, then seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_yarn(analyses: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lengths = sorted({row["length"] for a in analyses for row in a["long_context"]})
    for key, label in (("plain", "RoPE as trained"), ("yarn", "YaRN at inference")):
        ys = [mean([row[key] for a in analyses for row in a["long_context"] if row["length"] == n]) for n in lengths]
        ax.plot(lengths, [math.exp(y) for y in ys], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity on held-out books")
    ax.set_title(f"Long context for a model trained at {analyses[0]['seq_len']} tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(runs_dir: Path, report_dir: Path, scale: str, seeds: int, names: list[str]) -> Path:
    """Compute, draw and write report.md for the studies in `names`; copies the runs' small files along."""
    base = load_config(base_config_path(scale))
    known = studies(base)
    report_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# Ablation studies ({scale} scale, {seeds} seeds)", "",
             f"Regenerate from the metrics files kept beside this report: `tlm ablate report --scale {scale} "
             f"--seeds {seeds} --out {report_dir} --report {report_dir}`. "
             "Differences are final validation loss (nats) minus the baseline's, with a 95% confidence interval "
             "(paired t over seeds: each seed fixes the initial weights and the data order).", ""]
    for name in names:
        study = known[name]
        groups = _variant_runs(study, runs_dir, seeds)
        need = name in ("position", "yarn")
        analyses = {v: [analyse(r["dir"], base.data.seq_len) for r in rs] if need else [] for v, rs in groups.items()}
        if not any(groups.values()):
            lines += [f"## {study.title}", "", f"Claim: {study.claim}.", "", "No runs yet.", ""]
            continue
        label, evidence = verdict(study, groups, analyses)
        lines += [f"## {study.title}", "", f"Claim: {study.claim}.", "", f"**Verdict: {label}.** " + " ".join(evidence), ""]
        lines += _table(study, groups, base)
        if any(groups.values()) and study.kind != "yarn":
            plot_study(study, groups, report_dir / f"{name}.png", scale)
            lines += [f"![{study.title}]({name}.png)", ""]
        if name == "position" and any(analyses.values()):
            plot_position(analyses, report_dir / "position_loss.png")
            probes = {v: mean([a["position_probe_r2"] for a in items]) for v, items in analyses.items() if items}
            lines += ["How position is encoded: loss by position, and the R^2 of a linear probe predicting the position "
                      "from the last hidden states (held-out windows): " +
                      ", ".join(f"{v} {r2:.3f}" for v, r2 in probes.items()) + ".", "", "![loss by position](position_loss.png)", ""]
        if name == "yarn" and analyses.get(study.baseline):
            plot_yarn(analyses[study.baseline], report_dir / "yarn.png")
            lines += _yarn_table(analyses[study.baseline]) + ["![YaRN](yarn.png)", ""]
        for runs in groups.values():
            for run in runs:
                target = report_dir / "runs" / run["dir"].name
                if run["dir"].resolve() != target.resolve():
                    target.mkdir(parents=True, exist_ok=True)
                    for file in KEPT:
                        if (run["dir"] / file).is_file():
                            shutil.copyfile(run["dir"] / file, target / file)
    path = report_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _table(study: Study, groups: dict[str, list[dict]], base) -> list[str]:
    from tlm.model import TransformerLM

    rows = ["| variant | runs | final val loss (mean +- std) | diff to baseline [95% CI] | parameters |" +
            (" KV cache @512 / @4096 (bf16, batch 1) |" if study.kind == "equivalent" else ""),
            "|---|---|---|---|---|" + ("---|" if study.kind == "equivalent" else "")]
    baseline = groups.get(study.baseline, [])
    for variant, runs in groups.items():
        overrides = study.variants[variant]
        config = load_config(base_config_path_for(base), {k: v for k, v in overrides.items()}).model_config()
        with torch.device("meta"):
            params = TransformerLM(config).num_parameters()
        finals = [r["final_val"] for r in runs]
        cell = f"{mean(finals):.4f} +- {std(finals):.4f}" if finals else "-"
        diff = "baseline" if variant == study.baseline else (_cell(_compare(baseline, runs)) if runs and baseline else "-")
        row = f"| {variant} | {len(runs)} | {cell} | {diff} | {params:,} |"
        if study.kind == "equivalent":
            row += f" {kv_cache_bytes(config, 1, 512) / 2**20:.2f} MiB / {kv_cache_bytes(config, 1, 4096) / 2**20:.2f} MiB |"
        rows.append(row)
    return rows + [""]


def base_config_path_for(base) -> Path:
    """The recipe file a loaded base config came from (its name is the scale)."""
    return base_config_path(base.name)


def _yarn_table(analyses: list[dict]) -> list[str]:
    rows = ["| context | windows | perplexity, RoPE as trained | perplexity, YaRN (factor = context / trained) |",
            "|---|---|---|---|"]
    lengths = sorted({row["length"] for a in analyses for row in a["long_context"]})
    for n in lengths:
        items = [row for a in analyses for row in a["long_context"] if row["length"] == n]
        plain = mean([math.exp(r["plain"]) for r in items])
        yarn = mean([math.exp(r["yarn"]) for r in items])
        rows.append(f"| {n} | {sum(r['windows'] for r in items)} | {plain:.1f} | {yarn:.1f} |")
    return rows + [""]
