"""The statistics helper on inputs with known answers."""

from __future__ import annotations

import math

import pytest

from tlm.studies.stats import mean, paired_difference, std, t_critical, welch_difference


def test_t_critical_values() -> None:
    assert t_critical(1) == 12.706 and t_critical(2) == 4.303 and t_critical(10) == 2.228 and t_critical(30) == 2.042
    assert t_critical(2.9) == 4.303  # fractional Welch df round down: a wider, conservative interval
    assert 2.000 < t_critical(50) < 2.021 and t_critical(100000) == pytest.approx(1.96, abs=1e-3)
    assert t_critical(0) == math.inf


def test_mean_and_sample_std() -> None:
    assert mean([2, 4, 9]) == 5 and std([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(2.138, abs=1e-3)
    assert std([3.0]) == 0.0


def test_welch_interval_matches_the_textbook() -> None:
    d = welch_difference([1, 2, 3], [4, 5, 6])  # equal variances: df 4, t 2.776, se sqrt(2/3)
    assert d.estimate == 3 and d.df == pytest.approx(4)
    assert (d.low, d.high) == pytest.approx((3 - 2.776 * math.sqrt(2 / 3), 3 + 2.776 * math.sqrt(2 / 3)))
    assert d.excludes_zero
    unequal = welch_difference([10.0, 10.1, 9.9, 10.0], [12.0, 9.0, 15.0, 8.0])
    assert unequal.df < 4 and not unequal.excludes_zero  # the noisy side dominates the interval


def test_paired_interval_and_degenerate_cases() -> None:
    d = paired_difference([1, 2, 3], [2.1, 3.0, 4.2])  # differences 1.1, 1.0, 1.2
    assert d.estimate == pytest.approx(1.1) and d.df == 2
    assert (d.low, d.high) == pytest.approx((1.1 - 4.303 * 0.1 / math.sqrt(3), 1.1 + 4.303 * 0.1 / math.sqrt(3)))
    one = paired_difference([1.0], [2.0])
    assert one.estimate == 1.0 and one.low == -math.inf and not one.excludes_zero
    same = welch_difference([1.0, 1.0], [2.0, 2.0])
    assert (same.low, same.high) == (1.0, 1.0)
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])
