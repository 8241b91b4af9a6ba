"""The peer's side of sealed sessions, plus who may call it and how often.

Sessions are bounded three ways: per client identity, per client address and in total.
An identity or an address at its cap replaces its own least recently used session; a full
table evicts from the address holding the most sessions. So a flood of hellos costs the
flooder its own sessions, never an honest client's. Sessions idle `ttl_s` are forgotten; a
client whose session was forgotten gets UNAUTHENTICATED "unknown session" and simply opens a
new one (a replayed hello cannot reopen it: peer/hellos.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from protos.envelope import PUBLIC_KEY_LEN, ReplayWindow, SessionKeys

DEFAULT_MAX_SESSIONS = 4096
DEFAULT_SESSIONS_PER_IDENTITY = 64  # a coordinator needs one per peer; a few more across restarts
DEFAULT_SESSIONS_PER_ADDRESS = 256  # several coordinators may share a NAT address


@dataclass
class Session:
    keys: SessionKeys
    client: bytes  # the client's Ed25519 identity
    address: str = ""  # the client's network address (no port) when it opened the session
    last_used: float = field(default_factory=time.monotonic)
    window: ReplayWindow = field(default_factory=ReplayWindow)


class SessionTable:
    def __init__(
        self,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        ttl_s: float = 600.0,
        per_identity: int = DEFAULT_SESSIONS_PER_IDENTITY,
        per_address: int = DEFAULT_SESSIONS_PER_ADDRESS,
    ) -> None:
        self.max_sessions, self.ttl_s = max_sessions, ttl_s
        self.per_identity, self.per_address = per_identity, per_address
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()  # least recently used first
        self._groups: dict[bytes | str, OrderedDict[bytes, None]] = {}  # identity / address -> its sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, owner: bytes | str) -> int:
        """Sessions held by a client identity (bytes) or address (str)."""
        return len(self._groups.get(owner, ()))

    def add(self, keys: SessionKeys, client: bytes, address: str = "") -> Session:
        existing = self._sessions.get(keys.session_id)
        if existing is not None:
            return existing  # the same keys: keep their replay window, don't reset it
        self._expire()
        for owner, cap in ((client, self.per_identity), (address, self.per_address)):
            while self.count(owner) >= cap:
                self._drop(next(iter(self._groups[owner])))  # the owner's own least recently used
        while len(self._sessions) >= self.max_sessions:
            crowded = max((g for g in self._groups if isinstance(g, str)), key=self.count)
            self._drop(next(iter(self._groups[crowded])))
        session = self._sessions[keys.session_id] = Session(keys, client, address)
        for owner in (client, address):
            self._groups.setdefault(owner, OrderedDict())[keys.session_id] = None
        return session

    def get(self, session_id: bytes) -> Session | None:
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.last_used > self.ttl_s:
            self._drop(session_id)
            return None
        session.last_used = now
        self._sessions.move_to_end(session_id)
        for owner in (session.client, session.address):
            self._groups[owner].move_to_end(session_id)
        return session

    def _drop(self, session_id: bytes) -> None:
        session = self._sessions.pop(session_id)
        for owner in (session.client, session.address):
            group = self._groups[owner]
            del group[session_id]
            if not group:
                del self._groups[owner]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._sessions:
            sid, oldest = next(iter(self._sessions.items()))
            if now - oldest.last_used <= self.ttl_s:
                break
            self._drop(sid)


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
