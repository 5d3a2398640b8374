"""A run folder's history as a lineage of checkpoints: which checkpoint a plain rerun takes, what a rollback
does, and what pruning may delete.

Every checkpoint's trainer.json records its `lineage`: the run it belongs to (`run_id`, made when a run starts
from scratch and kept by every resume), its own `id`, and the checkpoint it continued from (`parent`, an id;
`parent_name`, that checkpoint's folder name, or its path when it lies in another run folder).

    RUN/checkpoints/step-N/        the line of descent of `latest`: `latest` and its ancestors (and, for a
                                   moment, the leftover of a kill while saving)
    RUN/checkpoints/latest         what a plain rerun (--checkpoint.resume=auto) continues
    RUN/checkpoints/abandoned/K/   the checkpoints a rollback left behind, whole, never pruned (K counts up)

A rollback (`--checkpoint.resume=RUN/checkpoints/step-M`, M not what `latest` names) starts a branch: once the
resume checks pass, the checkpoints that M does not descend from move to `abandoned/K/` and `latest` names M,
so a plain rerun follows the new branch and pruning counts along it, never by step number across branches.
Resuming a checkpoint in `abandoned/` switches back the same way. A step folder whose trainer.json names
another step or another run is refused whenever it would be used, and never pruned.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlm_base.errors import CheckpointError
from tlm_base.fileio import atomic_write_bytes, fsync_path
from tlm.checkpointing.layout import (
    COMPLETE, STEP_NAME, TRAINER, read_latest, read_trainer_state, verify,
)

log = logging.getLogger("tlm")
ABANDONED = "abandoned"
RUN_FILES = ("metrics.jsonl", "summary.json", "wandb_run_id")  # what a run writes beside checkpoints/


def new_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass(eq=False)
class Entry:
    """One step folder as found on disk (trainer.json read without hashing anything: cheap)."""

    path: Path
    step: int | None = None  # what its trainer.json says; None when unreadable
    lineage: dict[str, Any] | None = None  # None: unreadable, or written before lineages (an older tlm)
    complete: bool = False

    @property
    def name_step(self) -> int:
        match = STEP_NAME.fullmatch(self.path.name)
        return int(match.group(1)) if match else -1

    @property
    def id(self) -> str | None:
        return self.lineage["id"] if self.lineage else None

    @property
    def run_id(self) -> str | None:
        return self.lineage["run_id"] if self.lineage else None


def read_entry(path: Path) -> Entry:
    entry = Entry(path, complete=(path / COMPLETE).is_file() and (path / TRAINER).is_file())
    try:
        state = json.loads((path / TRAINER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return entry
    if isinstance(state, dict):
        step, lineage = state.get("step"), state.get("lineage")
        entry.step = step if isinstance(step, int) and not isinstance(step, bool) else None
        if isinstance(lineage, dict) and all(isinstance(lineage.get(k), str) for k in ("run_id", "id")):
            entry.lineage = lineage
    return entry


def step_folders(folder: Path) -> list[Entry]:
    """The step-N folders directly in `folder`, highest step first."""
    if not folder.is_dir():
        return []
    return [read_entry(p) for p in sorted(folder.iterdir(), reverse=True) if STEP_NAME.fullmatch(p.name) and p.is_dir()]


def abandoned_folders(root: Path) -> list[Entry]:
    base = root / ABANDONED
    if not base.is_dir():
        return []
    return [e for k in sorted(base.iterdir()) if k.is_dir() for e in step_folders(k)]


def foreign(entry: Entry, run_id: str | None) -> str | None:
    """Why `entry` is not a checkpoint of run `run_id` under its own name (None when it is)."""
    if entry.step is not None and entry.step != entry.name_step:
        return f"its trainer.json says step {entry.step}, its name step {entry.name_step}"
    if run_id and entry.run_id and entry.run_id != run_id:
        return f"it belongs to run {entry.run_id}, this folder's run is {run_id}"
    return None


def refuse_foreign(entry: Entry, run_id: str | None) -> None:
    problem = foreign(entry, run_id)
    if problem:
        raise CheckpointError(f"checkpoint '{entry.path}' was not written there by this run ({problem}); move it "
                              "out of the run folder, or resume it by path into a new --logging.run_dir")


def ancestry(start: Entry, pool: list[Entry]) -> tuple[list[Entry], bool]:
    """`start` and its ancestors found in `pool`, newest first; and whether the walk is certain (every parent
    known by id, or absent because pruned). A checkpoint without a readable lineage (an older tlm, or a damaged
    trainer.json) continues with the next lower step of the same run: the old, linear order."""
    by_id = {e.id: e for e in pool if e.id}
    run_id = start.run_id
    chain: list[Entry] = []
    certain, current = True, start
    while current is not None and current not in chain:
        chain.append(current)
        if current.lineage is not None:
            parent = current.lineage.get("parent")
            legacy = current.lineage.get("parent_legacy")
            current = by_id.get(parent) if parent else next(
                (e for e in pool if legacy and e.path.name == legacy and e.lineage is None), None)
        else:
            certain = False
            step = current.name_step
            current = next((e for e in pool if e.name_step < step and e.run_id in (None, run_id)), None)
    return chain, certain


@dataclass
class Start:
    """How a run starts in its folder: the checkpoint it resumes (None: from scratch), the lineage of its first
    checkpoint, and the changes to the folder to make once every resume check has passed (`apply`)."""

    run_dir: Path
    resume: Path | None
    lineage: dict[str, Any]
    abandon: list[Path] = field(default_factory=list)
    restore: list[Path] = field(default_factory=list)
    remove: list[Path] = field(default_factory=list)  # incomplete leftovers in the way of a restore
    wipe: bool = False

    @property
    def final(self) -> Path | None:
        """Where the resumed checkpoint lies once `apply` has run (a restored one is back in checkpoints/)."""
        if self.resume is not None and self.resume in self.restore:
            return self.run_dir / "checkpoints" / self.resume.name
        return self.resume

    def apply(self) -> None:
        """Rank 0, under the run folder's lock: delete an overwritten run, move the checkpoints off the resumed
        line to abandoned/, bring an abandoned line back, and point `latest` at the resumed checkpoint."""
        root = self.run_dir / "checkpoints"
        if self.wipe:
            wipe_run(self.run_dir)
        final = self.final
        if final is not None and final.parent == root and not self.restore:
            atomic_write_bytes(root / "latest", (final.name + "\n").encode())  # first: a kill below is tidied later
        if self.abandon:
            target = move_aside(self.abandon, root)
            log.warning("%s %s: moved %s (not on its line) to %s; nothing was deleted",
                        "switching to" if self.restore else "rollback to", self.resume.name,
                        ", ".join(p.name for p in self.abandon), target)
        for path in self.remove:
            shutil.rmtree(path)
        for path in self.restore:
            os.rename(path, root / path.name)
        if self.restore:
            fsync_path(root)
            atomic_write_bytes(root / "latest", (final.name + "\n").encode())
            log.warning("switched to the line of %s: moved %s back into %s", self.resume,
                        ", ".join(p.name for p in self.restore), root)
            for k in (root / ABANDONED).iterdir():
                if k.is_dir() and not any(k.iterdir()):
                    k.rmdir()


def move_aside(paths: list[Path], root: Path) -> Path:
    """Move whole checkpoints into a new RUN/checkpoints/abandoned/K/ (renames: nothing is copied or lost)."""
    base = root / ABANDONED
    taken = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    target = base / str(max(taken, default=0) + 1)
    target.mkdir(parents=True)
    for path in paths:
        os.rename(path, target / path.name)
    fsync_path(target)
    fsync_path(root)
    return target


def used_by(run_dir: Path) -> list[str]:
    """The checkpoints an earlier run left in `run_dir`, and its files beside them (empty: no checkpoint, a new
    run may start there; a metrics.jsonl alone, of a run killed before its first checkpoint, is continued)."""
    root = run_dir / "checkpoints"
    found = [e.path.name for e in reversed(step_folders(root))]
    if abandoned_folders(root):
        found.append(f"checkpoints/{ABANDONED}/")
    if not found:
        return []
    return found + [n for n in ("metrics.jsonl", "summary.json") if (run_dir / n).is_file()
                    and (run_dir / n).stat().st_size > 0]


def wipe_run(run_dir: Path) -> None:
    """Delete an earlier run's checkpoints and files (--checkpoint.overwrite): every COMPLETE first, so that a
    kill during the removal leaves nothing that looks whole."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for path in root.rglob(COMPLETE):
            path.unlink(missing_ok=True)
        (root / "latest").unlink(missing_ok=True)
        shutil.rmtree(root)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for path in run_dir.glob("nonfinite-step-*.json"):
        path.unlink()
    log.warning("--checkpoint.overwrite: deleted the earlier run's checkpoints and files in %s", run_dir)


def _used_refusal(run_dir: Path, found: list[str], what: str) -> CheckpointError:
    steps = [f for f in found if f.startswith("step-")]
    held = ([f"checkpoints {steps[0]}..{steps[-1]}" if len(steps) > 1 else f"checkpoint {steps[0]}"] if steps else [])
    held += [f for f in found if not f.startswith("step-")]
    return CheckpointError(
        f"run folder '{run_dir}' already holds a run ({', '.join(held)}): {what} would start another run over it; "
        "resume it (--checkpoint.resume=auto, the default), give the new run another --logging.run_dir, or pass "
        "--checkpoint.overwrite=true to delete that run and start afresh")


def _folder_run_id(root: Path, entries: list[Entry]) -> str | None:
    try:
        latest = read_latest(root.parent)
    except CheckpointError:
        latest = None
    named = next((e for e in entries if latest is not None and e.path == latest), None)
    if named is not None and named.run_id:
        return named.run_id
    return next((e.run_id for e in entries if e.complete and e.run_id and not foreign(e, None)), None)


def _first_sound(candidates: list[Entry], root: Path) -> Entry | None:
    """The first sound checkpoint of `candidates` (hashes checked), warning about those passed over; an error
    when some were damaged and none is sound (rather than start afresh over hours of training)."""
    passed = []
    for entry in candidates:
        problem = verify(entry.path)
        if problem is None:
            if passed:
                log.warning("skipped checkpoints: %s; resuming from %s", "; ".join(passed), entry.path.name)
            return entry
        log.warning("checkpoint %s is not loadable: %s", entry.path, problem)
        passed.append(f"{entry.path.name} ({problem})")
    if any("incomplete" not in p for p in passed):
        raise CheckpointError(f"no sound checkpoint in {root}: {'; '.join(passed)}. Nothing was loaded or deleted; "
                              "restore the files, or start afresh with --checkpoint.resume=none "
                              "--checkpoint.overwrite=true (which deletes them)")
    if passed:
        log.warning("no complete checkpoint in %s (%s); starting afresh", root, "; ".join(passed))
    return None


def _auto(run_dir: Path) -> Start:
    """--checkpoint.resume=auto: follow `latest` down its line to the first sound checkpoint."""
    root = run_dir / "checkpoints"
    entries = step_folders(root)
    latest_path = read_latest(run_dir)
    latest = next((e for e in entries if latest_path is not None and e.path == latest_path), None)
    if latest is None:  # no pointer (an older tlm, a kill before the first one, a deleted file): highest step
        if latest_path is not None:
            log.warning("%s names %s, which is missing; taking the newest checkpoint of the folder",
                        root / "latest", latest_path.name)
        top = next((e for e in entries if e.complete), None)
        if top is None:
            _first_sound(entries, root)  # warns about leftovers (or refuses damaged ones)
            return Start(run_dir, None, {"run_id": new_id(), "parent": None, "parent_name": None})
        latest = top
    refuse_foreign(latest, None)
    run_id = latest.run_id or new_id()
    pool = [e for e in entries if not foreign(e, run_id)]
    chain, certain = ancestry(latest, pool)
    for entry in entries:
        if foreign(entry, run_id):
            log.warning("ignoring %s: %s", entry.path, foreign(entry, run_id))
    chosen = _first_sound(chain, root)
    abandon = [e.path for e in pool if certain and e.complete and e.lineage and e not in chain]
    if chosen is None:
        return Start(run_dir, None, {"run_id": new_id(), "parent": None, "parent_name": None}, abandon=abandon)
    return Start(run_dir, chosen.path, _child_of(chosen, run_id), abandon=abandon)


def _child_of(entry: Entry, run_id: str, name: str | None = None) -> dict[str, Any]:
    lineage = {"run_id": run_id, "parent": entry.id, "parent_name": name or entry.path.name}
    if entry.lineage is None:
        lineage["parent_legacy"] = entry.path.name
    return lineage


def _inside(path: Path, root: Path) -> bool:
    parent = path.resolve().parent
    return parent == root.resolve() or parent.parent == (root / ABANDONED).resolve()


def plan_start(run_dir: Path, resume: str, overwrite: bool = False) -> Start:
    """Decide, without changing anything, how the run in `run_dir` starts for --checkpoint.resume=`resume`
    (auto | none | a checkpoint folder) and --checkpoint.overwrite; `Start.apply` then makes it so."""
    root = run_dir / "checkpoints"
    if resume == "auto":
        return _auto(run_dir)
    found = used_by(run_dir)
    if resume == "none":
        if found and not overwrite:
            raise _used_refusal(run_dir, found, "--checkpoint.resume=none")
        return Start(run_dir, None, {"run_id": new_id(), "parent": None, "parent_name": None}, wipe=bool(found))
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume: '{resume}' does not exist")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"checkpoint '{path}' cannot be loaded: {problem}")
    read_trainer_state(path)
    entry = read_entry(path)
    if not _inside(path, root):  # a checkpoint of another run folder: this folder starts a new run from it
        refuse_foreign(entry, None)
        if found and not overwrite:
            raise _used_refusal(run_dir, found, f"--checkpoint.resume={resume} (a checkpoint of another folder)")
        return Start(run_dir, path, _child_of(entry, new_id(), str(path.absolute())), wipe=bool(found))
    entries = step_folders(root)
    run_id = _folder_run_id(root, entries)
    refuse_foreign(entry, run_id)
    run_id = run_id or entry.run_id or new_id()
    everything = [e for e in entries + abandoned_folders(root) if not foreign(e, run_id)]
    target = next(e for e in everything if e.path.resolve() == path.resolve())
    chain, _ = ancestry(target, everything)
    on_line = {e.path for e in chain}
    here = {e.path.name: e for e in entries}
    restore = [e.path for e in reversed(chain) if e.path.parent != root]
    abandon = [e.path for e in entries if e.path not in on_line and e.complete and not foreign(e, run_id)]
    remove = []
    for name in (p.name for p in restore):
        clash = here.get(name)
        if clash is not None and clash.path not in abandon:
            if clash.complete:
                raise CheckpointError(f"cannot bring {path} back: {clash.path} is in the way ({foreign(clash, run_id)}); "
                                      "move it out of the run folder first")
            remove.append(clash.path)
    return Start(run_dir, target.path, _child_of(target, run_id), abandon=abandon, restore=restore, remove=remove)


def prune(run_dir: Path, keep_last: int, newest: Path) -> None:
    """Keep the `keep_last` newest complete checkpoints of `newest`'s line (`newest` among them) and delete its
    older ones, and leftovers of kills older than those kept. Checkpoints of other lines (abandoned/, or of
    another run) are never deleted."""
    if keep_last <= 0:
        return
    entries = step_folders(run_dir / "checkpoints")
    start = next((e for e in entries if e.path == newest), None)
    if start is None:
        return
    pool = [e for e in entries if not foreign(e, start.run_id)]
    line = [e for e in ancestry(start, pool)[0] if e.complete]
    if len(line) <= keep_last:
        oldest_kept = line[-1].name_step
        doomed = []
    else:
        oldest_kept = line[keep_last - 1].name_step
        doomed = line[keep_last:]
    doomed += [e for e in pool if not e.complete and e.name_step < oldest_kept]
    for entry in doomed:
        (entry.path / COMPLETE).unlink(missing_ok=True)  # first: a kill during the removal leaves it incomplete
        shutil.rmtree(entry.path, ignore_errors=True)


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a run in `run_dir` would resume for --checkpoint.resume=`resume`, changing nothing: None
    for 'none' or a fresh run; for 'auto' the first sound checkpoint down the line `latest` names
    (tlm.checkpointing.lineage). Incomplete checkpoints (a kill while saving) are passed over with a warning,
    and so are corrupt ones; but when every checkpoint of the line is corrupt the run stops with an error rather
    than start afresh over hours of training."""
    return plan_start(run_dir, resume, overwrite=True).resume


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The model folder that `path` means, wherever a model folder is asked for (`tlm generate`, `eval`, `export`):
    a model folder (tlm's or a transformers one) as it is; a checkpoint's step folder, its model/; the `latest`
    file, or a run folder (or its checkpoints/), the model of the checkpoint a plain rerun would resume (the first
    sound one down `latest`'s line). Anything else is one line saying what was found there."""
    from tlm.checkpointing.model_dir import CONFIG_NAME

    given = Path(path)
    if (given / CONFIG_NAME).is_file() or (given / "config.json").is_file():
        return given
    if given.name == "latest" and given.is_file():
        given = given.parent.parent
    if given.name == "checkpoints" and given.is_dir():
        given = given.parent
    if STEP_NAME.fullmatch(given.name) and given.is_dir():
        problem = verify(given, hashes=False)
        if problem:
            raise CheckpointError(f"checkpoint '{given}' cannot be used: {problem}")
        chosen = given
    elif (given / "checkpoints").is_dir():
        chosen = find_resume(given, "auto")
        if chosen is None:
            raise CheckpointError(f"run folder '{given}' holds no complete checkpoint yet; train it first "
                                  "(tlm train ... --logging.run_dir=" f"{given}) or name a model folder")
    elif not given.exists():
        raise CheckpointError(f"checkpoint '{given}' does not exist")
    else:
        raise CheckpointError(f"'{given}' is not a model folder (no {CONFIG_NAME} or config.json), a checkpoint, or a "
                              "run folder; give RUN, RUN/checkpoints/step-N or a model folder")
    model = chosen / "model"
    if not (model / CONFIG_NAME).is_file():
        raise CheckpointError(f"checkpoint '{chosen}' holds no model folder (model/{CONFIG_NAME})")
    if model != Path(path):
        log.info("using %s (%s)", model, "the newest complete checkpoint of the run" if chosen != given else
                 "the model of that checkpoint")
    return model
