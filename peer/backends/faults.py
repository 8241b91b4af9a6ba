"""A misbehaving peer on purpose: a backend wrapped with simulated faults.

For `moe-swarm simulate` (a slow device, a bad network) and for tests of spot checks (a
cheating peer). `with_faults` wraps a backend only when some fault is configured, so a
normal peer computes through its backend directly.

Impairment acts in `settle`, once a request's batch is computed and before it is answered:
a slowed device sleeps (slowdown - 1) x the compute time, the network adds a latency with
uniform jitter, and a lost request fails with UNAVAILABLE (what the caller sees when a
connection drops). Draws come from a seeded RNG so a simulation replays the same faults.
Corruption acts in `forward`: outputs scaled by (1 + corrupt), then signed as if honest.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from ..service.errors import RequestError
from .base import ExpertBackend


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
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "simulated loss")


class FaultyBackend(ExpertBackend):
    """`inner` with faults: every other attribute is the inner backend's."""

    def __init__(self, inner: ExpertBackend, impairment: Impairment | None = None, corrupt: float = 0.0) -> None:
        self.inner = inner
        self.impairment = impairment
        self.corrupt = corrupt

    def __getattr__(self, name: str) -> Any:  # only called for attributes not found here
        if name == "inner":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, segments: list[tuple[str, int]]) -> torch.Tensor:
        out = self.inner.forward(x, segments)
        # elementwise, so scaling a merged batch equals scaling each request's rows
        return out * (1 + self.corrupt) if self.corrupt else out

    def measure_throughput(self, rows: int = 128, repeats: int = 3) -> float:
        return self.inner.measure_throughput(rows, repeats)

    async def settle(self, compute_ms: float) -> None:
        if self.impairment is not None:
            await self.impairment.apply(compute_ms)


def with_faults(backend: ExpertBackend, impairment: Impairment | None, corrupt: float = 0.0) -> ExpertBackend:
    """`backend` as it is when no fault is configured, else wrapped."""
    if impairment is not None and not impairment.active:
        impairment = None
    if impairment is None and not corrupt:
        return backend
    return FaultyBackend(backend, impairment, corrupt)
