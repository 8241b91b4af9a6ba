"""Simulated slow device and bad network for one peer, for `moe-swarm simulate` only.

The server calls `apply(compute_ms)` after a batch is computed and before answering:
a slowed device sleeps (slowdown - 1) x the compute time, the network adds a latency with
uniform jitter, and a lost request fails with UNAVAILABLE (what the caller sees when a
connection drops). Draws come from a seeded RNG so a simulation replays the same faults.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import grpc


@dataclass
class Impairment:
    slowdown: float = 1.0  # compute takes this many times as long (>= 1)
    latency_ms: float = 0.0  # added to every answer
    jitter_ms: float = 0.0  # +- uniform around latency_ms (the total never goes below 0)
    loss: float = 0.0  # probability that a request fails with UNAVAILABLE
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.slowdown < 1:
            raise ValueError(f"slowdown must be >= 1, got {self.slowdown}")
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ValueError("latency and jitter must be >= 0 ms")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        self._rng = random.Random(self.seed)

    @property
    def active(self) -> bool:
        return self.slowdown > 1 or self.latency_ms > 0 or self.jitter_ms > 0 or self.loss > 0

    def delay_ms(self, compute_ms: float) -> float:
        jitter = self._rng.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0
        return (self.slowdown - 1) * compute_ms + max(self.latency_ms + jitter, 0.0)

    def lost(self) -> bool:
        return self.loss > 0 and self._rng.random() < self.loss

    async def apply(self, compute_ms: float) -> None:
        lost = self.lost()  # drawn first: the sequence of draws does not depend on timings
        delay = self.delay_ms(compute_ms)
        if delay > 0:
            await asyncio.sleep(delay / 1e3)
        if lost:
            from .server import RequestError  # server imports this module only for type hints

            raise RequestError(grpc.StatusCode.UNAVAILABLE, "simulated loss")
