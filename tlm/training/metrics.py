"""Training figures: the JSONL metrics file, the run summary, wandb (imported only when used) and the progress
bar. FLOPs per token and the devices' peaks (for MFU) are the model's: tlm.model.flops."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from tlm.checkpointing.layout import ValidationFigures
from tlm_base.fileio import LineAppender, atomic_write_bytes
from tlm_base.schema import NonNegInt, PosInt, Schema, StrictBool, load_json_text, parse

log = logging.getLogger("tlm")

def check_metrics_file(path: Path) -> None:
    """Refuse a metrics.jsonl that is there but not a regular file: a FIFO would block the run at its first line
    (and a device swallow every line). RankAgreedError: every rank sees the same run folder, rank 0 says it."""
    from tlm_base.errors import RankAgreedError
    from tlm_base.fileio import file_kind

    if os.path.lexists(path) and not os.path.isfile(path):
        raise RankAgreedError(f"{path} is not a regular file (it is {file_kind(path)}): tlm appends the run's figures "
                              "to it; remove it or choose another --logging.run_dir")


class MetricsFile:
    """Appends one JSON object per line, each written whole (see LineAppender): a crash loses nothing already
    logged, a full disk tears no line, and a torn last line left by a kill is cut when the run resumes."""

    def __init__(self, path: Path) -> None:
        check_metrics_file(path)
        self.file = LineAppender(path)

    def write(self, record: dict[str, Any]) -> None:
        """One line: the record and the wall-clock `time` it was written (UNIX seconds), whatever else it holds."""
        self.file.write_json({**record, "time": round(time.time(), 3)})

    def close(self) -> None:
        self.file.close()


class MetricsRecord(ValidationFigures):
    """One line of metrics.jsonl as read back: a step, and numbers (or null) for the figures."""

    step: NonNegInt
    loss: float | None = None
    lr: float | None = None
    tokens_seen: NonNegInt | None = None
    tokens_per_s: float | None = None
    config_change: dict[str, Any] | None = None


class RunSummary(Schema):
    """summary.json as read back (by the ablation runner and its report)."""

    steps: NonNegInt
    total_steps: PosInt
    complete: StrictBool
    tokens_seen: NonNegInt = 0
    num_parameters: NonNegInt | None = None
    val_loss: float | None = None


def read_summary(path: Path) -> dict[str, Any]:
    """A run's summary.json, validated."""
    from tlm_base.errors import TLMError

    data = load_json_text(path, TLMError)
    parse(RunSummary, data, str(path), TLMError)
    return data


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, each validated; a torn last line (a kill while writing) is left out
    with a warning, a bad line elsewhere is an error naming the line."""
    from tlm_base.errors import TLMError

    if not path.is_file():
        raise TLMError(f"{path} is missing")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        torn = number == len(lines)  # no newline after it
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if torn:
                log.warning("%s: its last line is torn (a write was interrupted); it is left out", path)
                continue
            raise TLMError(f"{path}:{number}: not valid JSON ({e})") from None
        parse(MetricsRecord, record, f"{path}:{number}", TLMError)
        records.append(record)
    return records



def line_of_descent(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the run as it stands, in step order: a session that starts at step S (a resume, or a
    rollback to S) supersedes every earlier record past S (steps redone, or an abandoned branch); a step logged
    twice keeps its last record (training and validation at one step merge)."""
    kept: dict[int, dict[str, Any]] = {}
    for record in records:
        step = record["step"]
        if "session" in record:
            kept = {s: r for s, r in kept.items() if s <= step}
            continue
        kept.setdefault(step, {}).update(record)
    return [kept[s] for s in sorted(kept)]


class WandbLogger:
    """wandb when asked for; never imported otherwise. A failing wandb warns and turns itself off."""

    def __init__(self, mode: str, project: str, name: str, config: dict[str, Any], run_dir: Path) -> None:
        if mode == "auto":  # wandb's own WANDB_MODE decides first, then whether there is a key to go online with
            env = os.environ.get("WANDB_MODE", "").strip().lower()
            mode = env if env in ("online", "offline", "disabled") else (
                "online" if os.environ.get("WANDB_API_KEY") else "disabled")
        self.mode = mode
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir), mode=mode,
                                  resume="allow", id=_run_id(run_dir))
        except Exception as e:  # no key, no network, bad settings: training goes on
            log.warning("wandb %s is off: %s: %s", mode, type(e).__name__, e)
            self.run = None

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(record, step=step)
        except Exception as e:
            log.warning("wandb logging failed, turning it off: %s", e)
            self.run = None

    def update_config(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.config.update(values, allow_val_change=True)
        except Exception as e:
            log.warning("wandb config update failed: %s", e)

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:
                log.warning("wandb finish failed: %s", e)


def _run_id(run_dir: Path) -> str:
    """A stable wandb run id per run folder, so a resumed run continues the same wandb run."""
    path = run_dir / "wandb_run_id"
    if path.exists():
        run_id = path.read_text(encoding="utf-8", errors="replace").strip()
        if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
            return run_id
        log.warning("%s holds %r, not a wandb run id; a new one is made", path, run_id[:40])
    import uuid

    run_id = uuid.uuid4().hex[:12]
    atomic_write_bytes(path, run_id.encode())
    return run_id


class RunLogger:
    """Where a run's figures go: metrics.jsonl and wandb (rank 0), the history the summary is made of, and the
    progress bar on a terminal, with messages (validation losses) printed above it instead of through it."""

    def __init__(self, config: dict[str, Any], name: str, run_dir: Path, is_main: bool, mode: str, project: str,
                 progress: bool) -> None:
        self.is_main = is_main
        self.history: list[dict[str, Any]] = []
        self.metrics = MetricsFile(run_dir / "metrics.jsonl") if is_main else None
        self.wandb = WandbLogger(mode, project, name, config, run_dir) if is_main else None
        self.interactive = is_main and progress and sys.stderr.isatty()
        self.bar = None

    def start_progress(self, total: int, initial: int) -> None:
        """The bar starts after the start-up lines, so that it never tangles with them."""
        self.bar = progress_bar(total, initial, self.interactive)

    def record(self, values: dict[str, Any]) -> None:
        if self.is_main:
            self.metrics.write(values)
            self.wandb.log({k: v for k, v in values.items() if k != "step"}, step=values["step"])
        self.history.append(values)

    def say(self, message: str) -> None:
        """A line for the user (rank 0): above the progress bar on a terminal, a log line otherwise."""
        if not self.is_main:
            return
        if self.interactive and self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            log.info("%s", message)

    def update(self, steps: int = 1, **postfix: str) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(refresh=False, **postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.is_main:
            self.metrics.close()
            self.wandb.finish()


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                mininterval=1.0)
