"""Small timing helpers shared by the demo and the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def percentile(values: list[float], q: float) -> float:
    """q in [0, 100], linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


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
