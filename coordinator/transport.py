"""gRPC channels to peers, one per endpoint, reused across calls; sealed sessions over them."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import grpc

from protos import DEFAULT_MAX_MESSAGE_BYTES, grpc_options, sealed
from protos import expert_service_pb2_grpc as pb_grpc
from protos.envelope import EnvelopeError, Identity, SessionKeys


class Channels:
    """Cache of grpc.aio channels; create and use only on the coordinator's loop thread."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.ExpertServiceStub]] = {}

    def stub(self, endpoint: str) -> pb_grpc.ExpertServiceStub:
        entry = self._stubs.get(endpoint)
        if entry is None:
            channel = grpc.aio.insecure_channel(endpoint, options=grpc_options(self.max_message_bytes))
            entry = self._stubs[endpoint] = (channel, pb_grpc.ExpertServiceStub(channel))
        return entry[1]

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()


@dataclass
class ClientSession:
    keys: SessionKeys
    opened_at: float
    ttl_s: float
    counters: itertools.count = field(default_factory=lambda: itertools.count(1))

    def fresh(self, now: float) -> bool:
        return now - self.opened_at < self.ttl_s * REKEY_FRACTION


REKEY_FRACTION = 0.5  # re-key well before the peer forgets an idle session


class Sessions:
    """One sealed session per peer (keyed by the peer's identity and endpoint), opened on first
    use, shared by concurrent calls, re-keyed before it expires; loop thread only."""

    def __init__(self, identity: Identity, channels: Channels) -> None:
        self.identity = identity
        self.channels = channels
        self._sessions: dict[tuple[str, str], ClientSession] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def get(self, endpoint: str, peer_kx: bytes, timeout: float) -> ClientSession:
        key = (endpoint, peer_kx.hex())
        session = self._sessions.get(key)
        if session is not None and session.fresh(time.monotonic()):
            return session
        async with self._locks.setdefault(key, asyncio.Lock()):  # concurrent calls share one opening
            session = self._sessions.get(key)
            if session is not None and session.fresh(time.monotonic()):
                return session
            hello, keys = sealed.hello(self.identity, peer_kx)
            accept = await self.channels.stub(endpoint).OpenSession(hello, timeout=timeout)
            if accept.session_id != keys.session_id:
                raise EnvelopeError("peer derived another session id: it does not hold the key it announced")
            session = self._sessions[key] = ClientSession(keys, time.monotonic(), float(accept.ttl_s or 60))
            return session

    def forget(self, endpoint: str, peer_kx: bytes) -> None:
        self._sessions.pop((endpoint, peer_kx.hex()), None)
