"""A run's curves as a PNG: training and validation loss against tokens seen, and the learning rate.

The trainer redraws RUN/curves.png after each evaluation (rank 0), so a run folder shows how it went without a
terminal, a network or wandb; `tlm plot RUN [RUN ...]` overlays several runs into one PNG. The x axis is tokens
seen, so runs of other batch sizes, world sizes or mixtures line up. matplotlib's object API (no pyplot: no global
state, nothing shown), written whole or not at all.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

from tlm_base.errors import TLMError
from tlm_base.fileio import atomic_write_bytes
from tlm.training.metrics import line_of_descent, read_metrics

log = logging.getLogger("tlm")
FIGURE = "curves.png"


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["tokens_seen"], r[key]) for r in records
              if r.get(key) is not None and r.get("tokens_seen") is not None and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def draw(runs: dict[str, list[dict[str, Any]]], title: str) -> bytes:
    """A PNG of the runs (label -> line-of-descent records): loss (training solid, validation dashed with markers,
    one colour per run) and learning rate against tokens seen."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    loss_axes, lr_axes = figure.subplots(1, 2, width_ratios=[2, 1])
    for i, (label, records) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        x, y = _series(records, "loss")
        loss_axes.plot(x, y, color=colour, linewidth=1.2, label=f"{label} train")
        x, y = _series(records, "val_loss")
        if x:
            loss_axes.plot(x, y, color=colour, linestyle="--", marker="o", markersize=3, label=f"{label} val")
        x, y = _series(records, "lr")
        lr_axes.plot(x, y, color=colour, linewidth=1.2, label=label)
    loss_axes.set(xlabel="tokens seen", ylabel="loss (nats per token)", title="loss")
    lr_axes.set(xlabel="tokens seen", ylabel="learning rate", title="learning rate")
    for axes in (loss_axes, lr_axes):
        axes.xaxis.set_major_formatter(EngFormatter())
        axes.grid(alpha=0.3)
    if loss_axes.get_legend_handles_labels()[0]:
        loss_axes.legend(fontsize=7)
    figure.suptitle(title)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=110)
    return out.getvalue()


def run_records(run: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """A run folder (or its metrics.jsonl): its name and its line-of-descent records. One-line TLMError when there
    is nothing to draw."""
    path = Path(run)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not path.exists():
        raise TLMError(f"{run} does not exist; give a run folder (one that holds metrics.jsonl)")
    if not metrics.is_file():
        raise TLMError(f"{run} holds no metrics.jsonl; give a run folder (runs/NAME) or a metrics.jsonl")
    records = line_of_descent(read_metrics(metrics))
    if not any(r.get("loss") is not None or r.get("val_loss") is not None for r in records):
        raise TLMError(f"{metrics} holds no logged loss yet (a run logs every logging.log_every steps)")
    name = (path if path.is_dir() else path.parent).resolve().name
    return name, records


def plot_runs(runs: list[str | Path], out: Path) -> dict[str, Any]:
    """Overlay the runs into one PNG at `out`; returns what was drawn (per run: steps, last losses)."""
    named: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        name, records = run_records(run)
        label = name if name not in named else f"{Path(run).resolve().parent.name}/{name}"
        while label in named:  # the same folder twice, or two of one name
            label += "'"
        named[label] = records
    title = next(iter(named)) if len(named) == 1 else f"{len(named)} runs"
    atomic_write_bytes(out, draw(named, title))
    drawn = {}
    for label, records in named.items():
        last_loss = next((r["loss"] for r in reversed(records) if r.get("loss") is not None), None)
        last_val = next((r["val_loss"] for r in reversed(records) if r.get("val_loss") is not None), None)
        drawn[label] = {"steps": records[-1]["step"], "tokens_seen": records[-1].get("tokens_seen"),
                        "loss": last_loss, "val_loss": last_val}
    return drawn


def refresh_run_figure(run_dir: Path) -> None:
    """Redraw RUN/curves.png from RUN/metrics.jsonl. A figure is never worth a run: any failure is one warning."""
    try:
        name, records = run_records(run_dir)
        atomic_write_bytes(run_dir / FIGURE, draw({name: records}, name))
    except Exception as e:  # noqa: BLE001 (matplotlib missing, a full disk, a torn file: the run goes on)
        log.warning("could not draw %s: %s", run_dir / FIGURE, str(e).splitlines()[0] if str(e) else type(e).__name__)
