"""Weighted mixtures of prepared datasets: several train splits read as one, in given proportions.

A mixture is one indexable set of rows, so the training stream shuffles, shards over ranks and resumes it
exactly as it does a single dataset (its order is a function of the seed and the consumed-sample counter,
also across a change of world size). One pass of the mixture holds as many rows as its parts together, M;
part s contributes round(w_s x M) of them (largest remainders), its own rows in a seeded order, repeated
where w_s x M exceeds its size: a small source is seen for several epochs, a large one for a fraction of one.
Every part must share the tokenizer, the row length and the packing mode, or the mixture is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.dataset import TokenRows
from tlm_base.errors import DataError


@dataclass
class MixPart:
    """One entry of `data.mix`."""

    name: str
    path: str
    weight: float


def parse_mix(entries: Any) -> list[MixPart]:
    """`data.mix` (a list of {path, weight[, name]}) as parts; one line naming the entry when it is wrong."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise DataError("data.mix must be a list of {path: PREPARED_FOLDER, weight: W} entries")
    parts = []
    for i, entry in enumerate(entries):
        where = f"data.mix[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"path", "weight", "name"} or "path" not in entry:
            raise DataError(f"{where} must be {{path: PREPARED_FOLDER, weight: W, name: optional}}, got {entry!r}")
        weight = entry.get("weight", 1.0)
        try:  # (an int too large for a float, 10**400, is not finite either)
            finite = not isinstance(weight, bool) and isinstance(weight, (int, float)) and math.isfinite(weight)
        except OverflowError:
            finite = False
        if not finite or weight <= 0:
            shown = repr(weight) if len(repr(weight)) < 40 else f"{repr(weight)[:20]}... ({len(repr(weight))} characters)"
            raise DataError(f"{where}.weight must be a finite number > 0, got {shown}")
        path = str(entry["path"])
        name = str(entry.get("name") or Path(path).name)
        parts.append(MixPart(name, path, float(weight)))
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise DataError(f"data.mix: two entries are named alike ({', '.join(names)}); give each a `name`")
    return parts


def allocate(weights: list[float], total: int) -> list[int]:
    """Split `total` rows in proportion to `weights` (largest remainders, ties to the earlier part), each >= 1.

    The weights are scaled by the largest first, so that their sum cannot overflow (1e308 + 1e308 is inf, which
    gave every part a share of 0: 2 rows in all instead of `total`)."""
    scaled = np.array(weights, dtype=np.float64)
    scaled = scaled / scaled.max()
    share = scaled / scaled.sum() * total
    counts = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return [max(1, int(c)) for c in counts]


class MixedRows:
    """The train splits of several prepared datasets as one set of rows, each part in its weighted share.

    Offers what the stream needs of `TokenRows` (len, gather, row_length, seq_len, pack, pad_token_id, and a
    fingerprint that covers every part's data and weight).
    """

    def __init__(self, parts: list[MixPart], seed: int, split: str = "train", verify: str = "sha256") -> None:
        self.parts = parts
        self.rows = [TokenRows(p.path, split, verify=verify) for p in parts]
        first = self.rows[0]
        shared = {"tokenizer": lambda m: m["tokenizer"]["sha256"], "row length": lambda m: m["row_length"],
                  "packing mode": lambda m: m["mode"]}
        for part, rows in zip(parts[1:], self.rows[1:]):
            for what, value in shared.items():
                a, b = value(first.manifest), value(rows.manifest)
                if a != b:
                    raise DataError(f"data.mix: '{part.path}' has another {what} than '{parts[0].path}' "
                                    f"({str(b)[:16]} vs {str(a)[:16]}); prepare every part with the same tokenizer, "
                                    "--seq_len and packing")
        self.manifest = first.manifest
        self.row_length, self.seq_len, self.pack = first.row_length, first.seq_len, first.pack
        self.pad_token_id = first.pad_token_id
        self.sizes = [len(r) for r in self.rows]
        self.counts = allocate([p.weight for p in parts], sum(self.sizes))
        self.starts = np.cumsum([0] + self.counts)
        self.orders = [np.random.default_rng([seed, 104729, i]).permutation(n) for i, n in enumerate(self.sizes)]
        self.fingerprint = hashlib.sha256(json.dumps(
            {"mix": [[r.fingerprint, p.weight] for r, p in zip(self.rows, parts)], "seed": seed}).encode()).hexdigest()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def epochs(self) -> dict[str, float]:
        """How many times each part's rows are seen in one pass of the mixture."""
        return {p.name: c / n for p, c, n in zip(self.parts, self.counts, self.sizes)}

    def part_of(self, indices: np.ndarray) -> np.ndarray:
        """The part each mixture row comes from."""
        return np.searchsorted(self.starts, indices, side="right") - 1

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row of a mixture of {len(self)}")
        out = np.empty((len(indices), self.row_length), dtype=np.int64)
        lengths = None if self.pack else np.empty(len(indices), dtype=np.int64)
        parts = self.part_of(indices)
        for s in np.unique(parts):
            where = parts == s
            local = (indices[where] - self.starts[s]) % self.sizes[s]
            rows, part_lengths = self.rows[s].gather(self.orders[s][local])
            out[where] = rows
            if lengths is not None:
                lengths[where] = part_lengths
        return out, lengths

    def describe(self) -> list[dict[str, Any]]:
        """Per part: its path, weight, rows, share of a pass and epochs per pass (logged at start, kept in the
        run's data identity)."""
        return [{"name": p.name, "path": p.path, "weight": p.weight, "fingerprint": r.fingerprint, "rows": n,
                 "rows_per_pass": c, "epochs_per_pass": round(c / n, 4)}
                for p, r, n, c in zip(self.parts, self.rows, self.sizes, self.counts)]


def mix_changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str:
    """What differs between two runs' mixtures (for the line that refuses a resume on another mixture)."""
    before, after = {p["name"]: p for p in old}, {p["name"]: p for p in new}
    out = [f"{name} removed" for name in before if name not in after]
    out += [f"{name} added" for name in after if name not in before]
    for name in before.keys() & after.keys():
        a, b = before[name], after[name]
        if a["weight"] != b["weight"]:
            out.append(f"{name} weight {a['weight']:g} -> {b['weight']:g}")
        if a["fingerprint"] != b["fingerprint"]:
            out.append(f"{name} data {a['fingerprint'][:12]}... -> {b['fingerprint'][:12]}...")
    return ", ".join(sorted(out)) or "the order of the parts"
