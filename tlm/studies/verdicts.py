"""The decision rules of the ablation studies (tlm.studies.catalogue.RULES) applied to runs: one verdict per study.

Differences are final validation loss (nats), paired over seeds (a seed fixes the initial weights and the data
order), with Student's t intervals (tlm.studies.stats).
"""

from __future__ import annotations

import math
from typing import Any

from tlm.studies.catalogue import EQUIVALENCE_MARGIN, STABILITY_MULTIPLIERS, TRAINS_MARGIN, YARN_FACTORS, Study
from tlm.studies.stats import Difference, equivalence, mean, paired_difference, welch_difference


def cell(d: Difference) -> str:
    return f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}]" if math.isfinite(d.low) else f"{d.estimate:+.4f} [n/a]"


def compare(base: list[dict], other: list[dict], level: float = 0.95) -> Difference:
    """other - base in final validation loss: paired over the seeds both have, else Welch's interval."""
    if not base or not other:
        return Difference(math.nan, -math.inf, math.inf, 0.0)
    by_seed = {r["seed"]: r["final_val"] for r in base}
    pairs = [(by_seed[r["seed"]], r["final_val"]) for r in other if r["seed"] in by_seed]
    if len(pairs) > 1:
        return paired_difference([a for a, _ in pairs], [b for _, b in pairs], level)  # same init and data order
    return welch_difference([r["final_val"] for r in base], [r["final_val"] for r in other])


def trains(run: dict[str, Any], unigram: float) -> bool:
    """The stability rule: finite losses and a final validation loss TRAINS_MARGIN below the unigram loss."""
    losses = [r["loss"] for r in run["train"]] + [r["val_loss"] for r in run["val"]]
    return bool(losses) and all(math.isfinite(x) for x in losses) and run["final_val"] <= unigram - TRAINS_MARGIN


def _label(low: float, high: float) -> str:
    return "reproduced" if low > 0 else "not reproduced" if high < 0 else "inconclusive"


Verdict = tuple[str, list[str]]


def _better(study: Study, base: list[dict], groups: dict[str, list[dict]], analyses: dict, unigram) -> Verdict:
    other = [v for v in groups if v != study.baseline][0]
    if not groups[other]:
        return "no data", [f"the {other} runs are missing"]
    d = compare(base, groups[other])
    return _label(d.low, d.high), [f"{other} - {study.baseline}: {cell(d)} nats of final validation loss (95% CI)"]


def _sweep(study: Study, base: list[dict], groups: dict[str, list[dict]], analyses: dict, unigram) -> Verdict:
    diffs = {v: compare(base, rs) for v, rs in groups.items() if v != study.baseline and rs}
    if not diffs:
        return "no data", ["only the baseline has runs"]
    beaten = [v for v, d in diffs.items() if d.high < 0]
    open_ = [v for v, d in diffs.items() if d.low <= 0 <= d.high]
    lines = [f"{v} - {study.baseline}: {cell(d)}" for v, d in diffs.items()]
    if beaten:
        return "not reproduced", [f"beaten by {', '.join(beaten)}"] + lines
    if open_:
        return "inconclusive", [f"not separated from {', '.join(open_)}"] + lines
    return "reproduced", ["the baseline beats every other grid point"] + lines


def _equivalent(study: Study, base: list[dict], groups: dict[str, list[dict]], analyses: dict, unigram) -> Verdict:
    outcomes, lines = {}, []
    for v, rs in groups.items():
        if v == study.baseline or not rs:
            continue
        d90 = compare(base, rs, level=0.90)
        outcomes[v] = equivalence(d90, EQUIVALENCE_MARGIN)
        lines.append(f"{v} - {study.baseline}: {d90.estimate:+.4f}, 90% CI [{d90.low:+.4f}, {d90.high:+.4f}]: "
                     f"{outcomes[v]}")
    if not outcomes:
        return "no data", ["only the baseline has runs"]
    counts = ", ".join(f"{sum(o == kind for o in outcomes.values())} {kind}" for kind in
                       ("equivalent", "better", "worse", "undecided") if kind in outcomes.values())
    summary = [f"against {study.baseline}, within +-{EQUIVALENCE_MARGIN} nats: {counts}"]
    if "worse" in outcomes.values():
        return "not reproduced", summary + lines
    return ("inconclusive" if "undecided" in outcomes.values() else "reproduced"), summary + lines


def _stability(study: Study, base: list[dict], groups: dict[str, list[dict]], analyses: dict, unigram) -> Verdict:
    if unigram is None:
        return "no data", ["the unigram loss of the validation split is missing (unigram.json)"]
    highest = {}
    for position in ("pre", "post"):
        ok = [float(v.split("lr=")[1]) for v, rs in groups.items()
              if v.startswith(position) and rs and all(trains(r, unigram) for r in rs)]
        highest[position] = max(ok) if ok else None
    pre, post = highest["pre"], highest["post"]
    lines = [f"unigram loss {unigram:.4f}; highest rate at which every seed trains: pre-norm {pre}, post-norm {post}"]
    if pre is None or post is None:
        return "inconclusive", lines
    lines.append(f"ratio pre / post = {pre / post:.3g} on a grid of x{', x'.join(str(m) for m in STABILITY_MULTIPLIERS)}")
    return ("reproduced" if pre / post >= 5 else "not reproduced"), lines


def _yarn(study: Study, base: list[dict], groups: dict[str, list[dict]], analyses: dict, unigram) -> Verdict:
    seeded = [(r["seed"], a) for r, a in zip(base, analyses.get(study.baseline, [])) if a.get("long_context")]
    if not seeded:
        return "no data", ["no long-context evaluation"]
    trained = seeded[0][1]["seq_len"]
    labels, lines = [], []
    for factor in YARN_FACTORS:
        pairs = [(row["plain"], row["yarn"]) for _, a in seeded for row in a["long_context"]
                 if row["length"] == factor * trained]
        if not pairs:
            continue
        plain, yarn = [p for p, _ in pairs], [y for _, y in pairs]
        d = paired_difference(plain, yarn) if len(pairs) > 1 else welch_difference(plain, yarn)
        labels.append("reproduced" if d.high < 0 else "not reproduced" if d.low > 0 else "inconclusive")
        lines.append(f"{factor}x ({factor * trained} tokens): YaRN - RoPE {cell(d)} nats")
    if not labels:
        return "no data", ["no evaluation beyond the trained length"]
    summary = [f"YaRN's loss is lower at {labels.count('reproduced')} of {len(labels)} lengths (95% CI below 0)"]
    if "not reproduced" in labels:
        return "not reproduced", summary + lines
    return ("reproduced" if set(labels) == {"reproduced"} else "inconclusive"), summary + lines


def curve(run: dict[str, Any]) -> list[tuple[int, float]]:
    """(tokens seen, validation loss) on the periodic evaluations' rows: the periodic figures, and at a final
    evaluation of the whole split its `val_loss_periodic` (the same rows); a final record without it is left out."""
    points = []
    for record in run["val"]:
        if record.get("val_loss_periodic") is not None:
            points.append((record["tokens_seen"], record["val_loss_periodic"]))
        elif record is not run["val"][-1] or record.get("val_tokens") == run["val"][0].get("val_tokens"):
            points.append((record["tokens_seen"], record["val_loss"]))
    return points


def tokens_to_target(run: dict[str, Any], target: float) -> float | None:
    """The first point of the run's curve at or below `target`, linearly interpolated in tokens between the two
    evaluations around it (None when it never gets there)."""
    points = curve(run)
    for (t0, l0), (t1, l1) in zip([(math.nan, math.inf)] + points, points):
        if l1 <= target:
            return float(t1) if not math.isfinite(l0) or l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def targets(base: list[dict]) -> dict[int, float]:
    """Per seed, the baseline's loss at its last step on the curve's measure (when its final record has it)."""
    return {r["seed"]: r["val"][-1]["val_loss_periodic"] for r in base
            if r["val"] and r["val"][-1].get("val_loss_periodic") is not None}


def best_variant(study: Study, groups: dict[str, list[dict]]) -> str | None:
    """The variant (other than the baseline) with the lowest mean final validation loss."""
    ranked = [(mean([r["final_val"] for r in rs]), v) for v, rs in groups.items() if v != study.baseline and rs]
    return min(ranked)[1] if ranked else None


def _target(study: Study, base: list[dict], groups: dict[str, list[dict]], analyses: dict, unigram) -> Verdict:
    goal = targets(base)
    best = best_variant(study, groups)
    if best is None:
        return "no data", ["only the baseline has runs"]
    if len(goal) < len(base):
        return "no data", ["a baseline run's final evaluation lacks val_loss_periodic (run before it was logged)"]
    reached = {r["seed"]: tokens_to_target(r, goal[r["seed"]]) for r in groups[best] if r["seed"] in goal}
    ends = {r["seed"]: r["summary"]["tokens_seen"] for r in base}
    d = compare(base, groups[best])
    shown = ", ".join(f"seed {s}: {'not reached' if t is None else f'{t / 1e6:.3f}M ({t / ends[s]:.2f}x)'}"
                      for s, t in sorted(reached.items()))
    lines = [f"Muon's rate: {best} (the lowest mean final validation loss of its sweep)",
             f"tokens to reach AdamW's final loss, against AdamW's {ends[min(ends)] / 1e6:.3f}M: {shown}",
             f"{best} - {study.baseline} at equal tokens: {cell(d)} nats of final validation loss (95% CI)"]
    if any(t is None for t in reached.values()) or d.low > 0:
        return "not reproduced", lines
    if reached and all(t < ends[s] for s, t in reached.items()) and d.high < 0:
        return "reproduced", lines
    return "inconclusive", lines


RULES_BY_KIND = {"better": _better, "sweep": _sweep, "equivalent": _equivalent, "stability": _stability,
                 "yarn": _yarn, "target": _target}
"""One function per study kind, each applying the rule stated in tlm.studies.catalogue.RULES."""


def verdict(study: Study, groups: dict[str, list[dict]], analyses: dict[str, list[dict]],
            unigram: float | None = None) -> Verdict:
    """('reproduced' | 'not reproduced' | 'inconclusive' | 'no data', lines of evidence), by the study's rule."""
    if not groups.get(study.baseline):
        return "no data", ["the baseline runs are missing"]
    return RULES_BY_KIND[study.kind](study, groups[study.baseline], groups, analyses, unigram)
