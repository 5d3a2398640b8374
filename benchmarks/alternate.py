"""Timing contenders fairly on a shared, noisy machine: step by step in turn, not each in its own block.

Timed one after the other, a contender that runs while another job wakes up looks slow; interleaved (A B, B A,
A B, ...) both see the same machine. Each contender's fastest and median step are reported with the load
average before and after, so a reader can tell a quiet measurement from a busy one.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def alternate(contenders: dict[str, Callable[[], Any]], steps: int, warmup: int,
              sync: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Run every contender `warmup` times untimed, then `steps` timed rounds, one step of each per round, the order
    reversed every other round. Returns {name: {"fastest", "median", "times"}} and "load_average" [before, after]."""
    before = load_average()
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for round_ in range(steps):
        for name in order if round_ % 2 == 0 else reversed(order):
            sync()
            start = time.perf_counter()
            contenders[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    result: dict[str, Any] = {name: {"fastest": min(ts), "median": statistics.median(ts), "times": ts}
                              for name, ts in times.items()}
    result["load_average"] = {"before": before, "after": load_average()}
    return result
