"""What this coordinator has observed about each peer: latency, failures, bans.

The DHT says who claims to serve; this cache says who actually answered lately. A peer
that fails is banned with exponential backoff (1 s, 2 s, 4 s, ... up to a minute), which
also hides a dead peer's stale DHT record until it expires. Latency feeds replica choice
(EWMA) and the hedging delay (a high percentile of recent round trips).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from coordinator.dispatch.stats import percentile

BAN_BASE_S = 1.0
BAN_MAX_S = 60.0
EWMA_ALPHA = 0.2
WINDOW = 64


@dataclass
class PeerHealth:
    ewma_ms: float | None = None
    recent_ms: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    failures: int = 0  # consecutive
    banned_until: float = 0.0
    inflight_rows: int = 0  # sent by us and not answered yet
    answered: int = 0  # Forward calls it answered (a peer with none is untried)
    reachable: bool | None = None  # what the last probe found (None: not probed yet)
    rows_per_s: float = 0.0  # the best throughput seen in its answers (rows / round trip)
    _p95_ms: float | None = None  # of recent_ms, computed when first asked after a change

    def observe(self, ms: float, rows: int = 0) -> None:
        self._ewma(ms)
        self.recent_ms.append(ms)
        self._p95_ms = None
        self.failures = 0
        self.answered += 1
        self.reachable = True
        if rows and ms > 0:
            self.rows_per_s = max(self.rows_per_s, rows * 1e3 / ms)

    def p95_ms(self) -> float:
        if self._p95_ms is None:
            self._p95_ms = percentile(list(self.recent_ms), 95)
        return self._p95_ms

    def outpaced(self, waited_ms: float) -> None:
        """A hedge elsewhere answered first after `waited_ms`: the peer is at least this slow
        now. Raises its expected latency (so replica choice shifts away) without a ban."""
        self._ewma(waited_ms)

    def _ewma(self, ms: float) -> None:
        self.ewma_ms = ms if self.ewma_ms is None else (1 - EWMA_ALPHA) * self.ewma_ms + EWMA_ALPHA * ms


class HealthCache:
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.peers: dict[str, PeerHealth] = {}

    def get(self, peer_id: str) -> PeerHealth:
        return self.peers.setdefault(peer_id, PeerHealth())

    def banned(self, peer_id: str) -> bool:
        health = self.peers.get(peer_id)
        return health is not None and health.banned_until > self.clock()

    def fail(self, peer_id: str) -> float:
        """Record a failure; returns the ban length in seconds."""
        health = self.get(peer_id)
        ban = min(BAN_BASE_S * 2**health.failures, BAN_MAX_S)
        health.failures += 1
        health.banned_until = self.clock() + ban
        return ban

    def ban(self, peer_id: str, seconds: float) -> None:
        """A ban that is not a failure streak: e.g. a peer proven to return wrong outputs."""
        health = self.get(peer_id)
        health.banned_until = max(health.banned_until, self.clock() + seconds)

    def expected_ms(self, peer_id: str, default_ms: float) -> float:
        health = self.peers.get(peer_id)
        return default_ms if health is None or health.ewma_ms is None else health.ewma_ms

    def hedge_delay_ms(self, peer_id: str, default_ms: float, minimum_ms: float) -> float:
        """The peer's observed p95 round trip (the default until enough samples exist)."""
        health = self.peers.get(peer_id)
        if health is None or len(health.recent_ms) < 8:
            return default_ms
        return max(health.p95_ms(), minimum_ms)
