"""The journal of an interrupted prepare: every committed shard with the exact point of the input where the next
one starts and how far each source was read (with the sha256 of those bytes), so that a rerun resumes there,
byte-identical, or starts afresh when anything it was made from has changed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from data_pipeline.formats import JournalEntry, JournalHeader
from data_pipeline.opening import sha256_prefix
from data_pipeline.packing import SplitState
from data_pipeline.prepare_config import SPLITS, input_changes
from data_pipeline.sources import Source
from tlm_base.errors import DataError
from tlm_base.fileio import cut_torn_tail, sha256_file
from tlm_base.schema import parse

log = logging.getLogger("tlm.prepare")
JOURNAL = ".prepare-journal.jsonl"


def read_journal(out: Path, fingerprint: str, described: dict[str, Any],
                 sources: list[Source]) -> dict[str, SplitState] | None:
    """The committed state of an interrupted run with the same inputs, or None to start afresh (no journal,
    a committed shard damaged since, or a source whose bytes that run read differ from the file's now: it
    changed while that run read it). Other inputs or settings are refused: mixing them would be silent."""
    path = out / JOURNAL
    if not path.exists():
        return None
    cut_torn_tail(path)  # a line cut by a kill or a full disk: that shard was never recorded, so it is redone
    fix = "rerun with --overwrite to start afresh (losing the interrupted progress)"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e}); {fix}") from None
        schema = JournalHeader if number == 1 else JournalEntry
        records.append(parse(schema, record, f"{path}:{number}", DataError, fix))
    if not records:
        return None
    header = records[0]
    if header.fingerprint != fingerprint:
        changes = input_changes(header.described, described)
        old_paths = [s["path"] for s in (header.described or {}).get("sources", [])]
        if header.described and old_paths == [s["path"] for s in described["sources"]] and \
                {k: v for k, v in header.described.items() if k != "sources"} == \
                {k: v for k, v in described.items() if k != "sources"}:
            # Same flags, same files, other bytes: an input was edited under an interrupted run.
            raise DataError(f"'{out}' holds an interrupted prepare whose input has changed since ({changes}); "
                            f"{fix} from the new content, or restore the file and rerun")
        log.warning("%s: an interrupted prepare with other settings is there (%s); starting afresh", out, changes)
        return None
    states = {split: SplitState() for split in SPLITS}
    for entry in records[1:]:
        states[entry.split] = SplitState(**entry.state.model_dump(include=set(SplitState.__dataclass_fields__)))
    for split, state in states.items():
        for shard in state.shards:
            file = out / shard["file"]
            if not file.exists() or file.stat().st_size != shard["bytes"] or sha256_file(file) != shard["sha256"]:
                log.warning("%s: committed shard %s is missing or damaged; starting afresh", out, shard["file"])
                return None
    read = getattr(records[-1], "read", None) if len(records) > 1 else None
    if read is not None:  # the committed shards came from these bytes: the file must still begin with them
        source = sources[read.source] if read.source < len(sources) else None
        try:
            same = source is not None and sha256_prefix(source.path, read.bytes) == read.sha256
        except OSError:
            same = False
        if not same:
            log.warning("%s: %s changed while the interrupted prepare read it (its first %d bytes differ from those "
                        "read then); starting afresh", out, source.path if source else "a source", read.bytes)
            return None
    return states
