"""Small statistics for comparing runs across seeds: mean, standard deviation, Welch's 95% interval.

With a handful of seeds the t distribution matters (df = 1 gives t = 12.71), so intervals are wide and
honest; no scipy needed: two-sided 95% critical values of Student's t are tabulated below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Two-sided 95% critical values t_{0.975, df} for df = 1..30; larger df use the normal 1.96 approximation
# beyond 120 and linear interpolation in 1/df between the table's last rows.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
T975_LARGE = {40: 2.021, 60: 2.000, 120: 1.980}
# One-sided 95% (two-sided 90%) values t_{0.95, df}: the two one-sided tests of an equivalence test (TOST).
T95 = [6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753,
       1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697]
T95_LARGE = {40: 1.684, 60: 1.671, 120: 1.658}
TABLES = {0.95: (T975, T975_LARGE, 1.960), 0.90: (T95, T95_LARGE, 1.645)}


def t_critical(df: float, level: float = 0.95) -> float:
    """Two-sided `level` critical value of Student's t (0.95 or 0.90); a fractional df (Welch) is rounded down,
    which widens the interval (conservative)."""
    small, large, normal = TABLES[level]
    if df <= 0 or math.isnan(df):
        return math.inf
    whole = max(1, int(math.floor(df)))
    if whole <= 30:
        return small[whole - 1]
    points = [(30, small[-1])] + sorted(large.items()) + [(math.inf, normal)]
    for (d0, t0), (d1, t1) in zip(points, points[1:]):
        if whole <= d1:
            if d1 == math.inf:
                return t0 + (normal - t0) * (1 - d0 / whole)
            return t0 + (t1 - t0) * (1 / d0 - 1 / whole) / (1 / d0 - 1 / d1)
    return normal


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def std(values: list[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single value."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Difference:
    """mean(b) - mean(a) with its 95% confidence interval."""

    estimate: float
    low: float
    high: float
    df: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def welch_difference(a: list[float], b: list[float]) -> Difference:
    """Welch's t interval for mean(b) - mean(a) (unequal variances); infinite when a side has one value."""
    estimate = mean(b) - mean(a)
    if len(a) < 2 or len(b) < 2:
        return Difference(estimate, -math.inf, math.inf, 0.0)
    va, vb = std(a) ** 2 / len(a), std(b) ** 2 / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(estimate, estimate, estimate, math.inf)
    df = (va + vb) ** 2 / ((va**2 / (len(a) - 1) if va else 0) + (vb**2 / (len(b) - 1) if vb else 0))
    half = t_critical(df) * se
    return Difference(estimate, estimate - half, estimate + half, df)


def paired_difference(a: list[float], b: list[float], level: float = 0.95) -> Difference:
    """The two-sided `level` interval for the mean of b_i - a_i over matched pairs (same seed: same init and
    data order)."""
    if len(a) != len(b):
        raise ValueError("paired samples need the same length")
    diffs = [y - x for x, y in zip(a, b)]
    estimate = mean(diffs)
    if len(diffs) < 2:
        return Difference(estimate, -math.inf, math.inf, 0.0)
    half = t_critical(len(diffs) - 1, level) * std(diffs) / math.sqrt(len(diffs))
    return Difference(estimate, estimate - half, estimate + half, len(diffs) - 1)


def equivalence(d90: Difference, margin: float) -> str:
    """Two one-sided tests (TOST, each at 5%) on a 90% interval of b - a against +-margin:
    'equivalent' (inside), 'better' / 'worse' (entirely below -margin / above +margin), else 'undecided'."""
    if -margin < d90.low and d90.high < margin:
        return "equivalent"
    if d90.high < -margin:
        return "better"
    if d90.low > margin:
        return "worse"
    return "undecided"
