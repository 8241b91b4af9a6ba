"""Where a peer's start-up time goes: seconds per phase, from the process's launch to serving.

Churn recovery is bounded by how fast a restarted peer serves again, so the peer says it in
its log and ready file, and `moe-swarm bench startup` reads it from there.
"""

from __future__ import annotations

import os
import time


def seconds_since_launch() -> float:
    """How long this process has run (the kernel's start time, to its 10 ms tick); 0 where
    /proc is not there to say."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5): ticks after boot
    except (OSError, IndexError, ValueError):
        return 0.0
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)


class StartupClock:
    """Phases in the order they end; the first runs from the process's launch (interpreter and
    imports) to the clock's creation."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.phases: dict[str, float] = {"imports": seconds_since_launch()}
        self._start = self._last - self.phases["imports"]

    def mark(self, phase: str) -> None:
        """End `phase` now (a phase marked again adds to its time)."""
        now = time.monotonic()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return self._last - self._start

    def summary(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.phases.items())
        return f"{self.total:.1f}s after launch ({parts})"

    def as_dict(self) -> dict[str, float]:
        return {"total": round(self.total, 3), **{k: round(v, 3) for k, v in self.phases.items()}}
