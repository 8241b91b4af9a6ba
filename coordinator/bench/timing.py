"""Timing helpers for the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from coordinator.dispatch.stats import percentile


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
    """Milliseconds of each of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(times), "p99_ms": percentile(times, 99), "n": len(times)}


def spread(total: int, rounds: int) -> list[int]:
    """`total` calls spread over `rounds` blocks as evenly as possible (every block >= 1)."""
    return [max(1, total // rounds + (i < total % rounds)) for i in range(rounds)]
