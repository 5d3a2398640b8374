"""The figures of the ablation report (matplotlib, written as PNG beside report.md), through one helper."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlm.studies.catalogue import Study
from tlm.studies.stats import mean
from tlm.studies.verdicts import curve


@contextlib.contextmanager
def figure(path: Path, title: str, panels: int = 1, size: tuple[float, float] = (7, 4.5)) -> Iterator[list[Any]]:
    """Axes to draw on (one per panel); on exit: grids, legends, the title, a tight layout, the PNG, closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=size)
    axes = list(axes) if panels > 1 else [axes]
    try:
        yield axes
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        if panels > 1:
            fig.suptitle(title)
        else:
            axes[0].set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def _curve(runs: list[dict], kind: str, one_measure: bool = False) -> tuple[list[float], list[float], list[float],
                                                                            list[float]]:
    """Mean, lowest and highest across seeds at each point; with `one_measure`, validation on the periodic rows to the
    end (tlm.studies.verdicts.curve) rather than the final evaluation of the whole split as the last point."""
    key = "loss" if kind == "train" else "val_loss"
    if one_measure and kind == "val":
        series = [curve(run) for run in runs]
    else:
        series = [[(r["tokens_seen"], r[key]) for r in run[kind]] for run in runs]
    length = min(len(s) for s in series)
    xs = [series[0][i][0] for i in range(length)]
    ys = [[s[i][1] for s in series] for i in range(length)]
    return xs, [mean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def plot_study(study: Study, groups: dict[str, list[dict]], path: Path, scale: str) -> None:
    """Training and validation loss against tokens seen, one line per variant, a band across seeds."""
    with figure(path, f"{study.title} ({scale} scale; band: range across seeds)", panels=2, size=(12, 4.5)) as axes:
        for ax, kind, label in ((axes[0], "train", "training loss"), (axes[1], "val", "validation loss")):
            for variant, runs in groups.items():
                if not runs or not runs[0][kind]:
                    continue
                xs, ys, lo, hi = _curve(runs, kind, one_measure=study.kind == "target")
                line, = ax.plot([x / 1e6 for x in xs], ys, label=f"{variant} ({len(runs)} seeds)",
                                linewidth=2.2 if variant == study.baseline else 1.4)
                ax.fill_between([x / 1e6 for x in xs], lo, hi, color=line.get_color(), alpha=0.2)
            ax.set_xlabel("tokens seen (millions)")
            ax.set_ylabel(f"{label} (nats)")
            ax.set_title(label + (" (the periodic rows, to the end)" if study.kind == "target" and kind == "val" else ""))
            finite = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
            if finite:
                ax.set_ylim(min(finite) - 0.1, min(max(finite), min(finite) + 4))


def plot_position(analyses: dict[str, list[dict]], path: Path) -> None:
    """Loss by position in the window, per model (mean over held-out windows, then seeds)."""
    with figure(path, "Loss by position in the window (mean over held-out windows, then seeds)") as (ax,):
        for variant, items in analyses.items():
            curves = [a["loss_by_position"] for a in items if a.get("loss_by_position")]
            if curves:
                ax.plot([mean(c) for c in zip(*curves)], label=f"{variant} ({len(curves)} seeds)")
        ax.set_xlabel("position in the window")
        ax.set_ylabel("validation loss (nats)")


def plot_yarn(analyses: list[dict], path: Path) -> None:
    """Perplexity on held-out books against context length, RoPE as trained and with YaRN."""
    with figure(path, f"Long context for a model trained at {analyses[0]['seq_len']} tokens") as (ax,):
        lengths = sorted({row["length"] for a in analyses for row in a["long_context"]})
        for key, label in (("plain", "RoPE as trained"), ("yarn", "YaRN at inference")):
            ys = [mean([row[key] for a in analyses for row in a["long_context"] if row["length"] == n]) for n in lengths]
            ax.plot(lengths, [math.exp(y) for y in ys], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity on held-out books")
