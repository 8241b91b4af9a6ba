"""The peer's side of sealed sessions, plus who may call it and how often.

Sessions are bounded (oldest idle evicted first) and forgotten after `ttl_s` idle, so a
flood of hellos cannot grow memory; a client whose session was forgotten gets
UNAUTHENTICATED "unknown session" and simply opens a new one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from protos.envelope import PUBLIC_KEY_LEN, ReplayWindow, SessionKeys


@dataclass
class Session:
    keys: SessionKeys
    client: bytes  # the client's Ed25519 identity
    last_used: float = field(default_factory=time.monotonic)
    window: ReplayWindow = field(default_factory=ReplayWindow)


class SessionTable:
    def __init__(self, max_sessions: int = 4096, ttl_s: float = 600.0) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, keys: SessionKeys, client: bytes) -> Session:
        existing = self._sessions.get(keys.session_id)
        if existing is not None:
            # a replayed hello derives the same session: keep its replay window, don't reset it
            return existing
        self._expire()
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session = self._sessions[keys.session_id] = Session(keys, client)
        return session

    def get(self, session_id: bytes) -> Session | None:
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.last_used > self.ttl_s:
            del self._sessions[session_id]
            return None
        session.last_used = now
        self._sessions.move_to_end(session_id)
        return session

    def _expire(self) -> None:
        now = time.monotonic()
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.last_used <= self.ttl_s:
                break
            self._sessions.popitem(last=False)


def read_allowlist(path: str | Path) -> frozenset[bytes]:
    """Coordinator public keys (hex, one per line, '#' comments) allowed to use a private peer."""
    keys = set()
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            key = b""
        if len(key) != PUBLIC_KEY_LEN:
            raise ValueError(f"{path}:{n}: expected a {PUBLIC_KEY_LEN}-byte hex public key, got {line!r}")
        keys.add(key)
    return frozenset(keys)


class RateLimiter:
    """Token buckets of token rows per client: `rate` rows/s, bursts up to `burst` rows.
    Buckets of clients idle long enough to be full again are dropped (bounded memory)."""

    def __init__(self, rate: float, burst: float, max_clients: int = 65536) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate limit and burst must be > 0")
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self._buckets: OrderedDict[bytes | str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def allow(self, client: bytes | str, rows: int) -> bool:
        now = time.monotonic()
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        ok = tokens >= rows
        self._buckets[client] = (tokens - rows if ok else tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return ok
