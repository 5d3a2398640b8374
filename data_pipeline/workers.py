"""Splitting `prepare` across workers (e.g. a Slurm job array) and merging their outputs."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from data_pipeline.shards import MANIFEST
from data_pipeline.sources import Source
from tlm_base.errors import DataError
from tlm_base.fileio import atomic_write_json

SPLITS = ("train", "val")


def worker_dir(out: Path, index: int, count: int) -> Path:
    return out / f"worker-{index:03d}-of-{count:03d}"


def worker_dirs(out: Path) -> list[Path]:
    """The worker-I-of-N folders in `out` (not the .partial folders they are made in)."""
    return sorted(p for p in out.glob("worker-*-of-*") if re.fullmatch(r"worker-\d+-of-\d+", p.name) and p.is_dir())


def assign_sources(sources: list[Source], workers: int, index: int) -> tuple[list[int] | None, bool]:
    """Source indices of this worker (balanced by size), or (None, True) to split by document instead."""
    if workers == 1:
        return None, False
    if len(sources) < workers or any(s.size is None for s in sources):
        return None, True
    load = [0] * workers
    mine = []
    for i in sorted(range(len(sources)), key=lambda i: (-sources[i].size, i)):
        w = min(range(workers), key=lambda w: (load[w], w))
        load[w] += sources[i].size
        if w == index:
            mine.append(i)
    return sorted(mine), False


def merge_workers(out_dir: str | Path) -> dict[str, Any]:
    """Combine the manifests of `prepare --num_workers N` runs into OUT/manifest.json (one merge at a time)."""
    from tlm_base.locks import FolderLock

    root = Path(out_dir)
    if not root.is_dir():
        raise DataError(f"'{root}' is not a folder of worker outputs")
    with FolderLock(root, "prepare output", hint="wait for that merge to finish"):
        return _merge(root)


def _merge(root: Path) -> dict[str, Any]:
    parts = worker_dirs(root)
    if not parts:
        raise DataError(f"'{root}' holds no worker-I-of-N folders to merge")
    count = int(parts[0].name.rsplit("-", 1)[1])
    expected = [worker_dir(root, i, count) for i in range(count)]
    missing = [p.name for p in expected if not (p / MANIFEST).exists()]
    if missing:
        raise DataError(f"cannot merge '{root}': workers not finished: {', '.join(missing)}")
    from data_pipeline.dataset import load_manifest

    manifests = [load_manifest(p) for p in expected]
    first = manifests[0]
    for key in ("seq_len", "mode", "dtype", "tokenizer", "text_field", "sample_by", "val"):
        for p, m in zip(expected, manifests):
            if m[key] != first[key]:
                raise DataError(f"cannot merge: {p.name} has {key}={m[key]!r}, {expected[0].name} has {first[key]!r}")
    merged = {k: v for k, v in first.items() if k not in ("sources", "splits", "skipped", "workers", "characters", "inputs")}
    merged["fingerprint"] = hashlib.sha256("".join(m["fingerprint"] for m in manifests).encode()).hexdigest()
    merged["workers"] = {"count": count}
    merged["sources"] = [s for m in manifests for s in m["sources"]]
    merged["characters"] = sum(m["characters"] for m in manifests)
    reasons: dict[str, int] = {}
    for m in manifests:
        for reason, n in m["skipped"]["by_reason"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    merged["skipped"] = {"total": sum(reasons.values()), "by_reason": reasons}
    merged["splits"] = {}
    for split in SPLITS:
        shards = [{**s, "file": f"{p.name}/{s['file']}"} for p, m in zip(expected, manifests) for s in m["splits"][split]["shards"]]
        merged["splits"][split] = {
            key: sum(m["splits"][split].get(key, 0) for m in manifests)
            for key in ("rows", "tokens", "documents", "documents_in_rows", "dropped_tokens", "truncated_documents")
        } | {"shards": shards, "max_token_id": max((s.get("max_token_id") or 0 for s in shards), default=None)}
    if merged["splits"]["train"]["rows"] == 0:
        raise DataError(f"merged dataset in '{root}' has no training rows")
    atomic_write_json(root / MANIFEST, merged)
    return merged
