"""gRPC channels to peers, one per endpoint, reused across calls; a Forward stream per peer for
small requests; sealed sessions over them. A relayed peer (its record carries `reach`) gets
the same streams and sessions over libp2p (coordinator/dispatch/relayed.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from coordinator.dispatch import sealed
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos.envelope import EnvelopeError, Identity, SessionKeys
from protos.limits import DEFAULT_MAX_MESSAGE_BYTES, grpc_options

if TYPE_CHECKING:
    from coordinator.dispatch.relayed import RelayedStub, RelayLink
    from protos.reach import Reach

# Requests up to this many payload bytes go on the peer's stream; bigger ones as unary calls,
# each on its own HTTP/2 stream, so a big message never holds back the small ones behind it.
STREAM_MAX_BYTES = 256 * 1024


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a unary call would have raised: callers handle both transports alike."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _refusal_error(refusal: pb.Refusal) -> grpc.aio.AioRpcError:
    code = next((c for c in grpc.StatusCode if c.value[0] == refusal.code), grpc.StatusCode.UNKNOWN)
    return rpc_error(code, refusal.message)


Outgoing = tuple[pb.ForwardRequest, "asyncio.Future | None"]  # a request, and what to resolve once it is written


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded (stream)"))


class PeerStream:
    """One ForwardStream to a peer, shared by every concurrent call to it (loop thread only).

    Requests go out through a queue the stream consumes (a caller cancelled mid-write would
    cancel the whole gRPC call), answers are matched by request_id, and a caller that gives up
    (deadline, lost hedge) tells the peer to drop its request. A broken stream fails the calls
    waiting on it with the error a unary call would have raised; the next call opens a new one.
    """

    def __init__(self, stub: pb_grpc.ExpertServiceStub) -> None:
        self._stub = stub
        self._outbox: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future] = {}
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task | None = None

    def _open(self) -> tuple[asyncio.Queue, dict[str, asyncio.Future]]:
        if self._reader is None or self._reader.done():
            outbox: asyncio.Queue[Outgoing | None] = asyncio.Queue()

            async def requests() -> AsyncIterator[pb.ForwardRequest]:
                while (item := await outbox.get()) is not None:
                    request, sent = item
                    yield request
                    # gRPC asks for the next request once this one is written
                    if sent is not None:
                        _resolve(sent)

            self._outbox, self._pending = outbox, {}
            self._call = self._stub.ForwardStream(requests())
            self._reader = asyncio.get_running_loop().create_task(self._read(self._call, self._pending, outbox))
        return self._outbox, self._pending

    @staticmethod
    async def _read(
        call: grpc.aio.StreamStreamCall, pending: dict[str, asyncio.Future], outbox: asyncio.Queue
    ) -> None:
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, "the peer ended the stream")
        try:
            async for reply in call:
                future = pending.pop(reply.request_id, None)
                if future is None or future.done():
                    continue  # given up on meanwhile
                if reply.HasField("refusal"):
                    future.set_exception(_refusal_error(reply.refusal))
                else:
                    future.set_result(reply)
        except grpc.aio.AioRpcError as e:
            error = e
        except asyncio.CancelledError:
            error = rpc_error(grpc.StatusCode.CANCELLED, "stream closed")
            raise
        finally:
            outbox.put_nowait(None)  # ends this stream's request generator: gRPC's task feeding it must not linger
            for future in pending.values():
                if not future.done():
                    future.set_exception(error)
            pending.clear()

    def forward(
        self, request: pb.ForwardRequest, timeout: float, sent: asyncio.Future | None = None
    ) -> asyncio.Future[pb.ForwardResponse]:
        """The future answer to `request`; `sent` (if given) resolves once the request is written.
        Cancelling the future gives up on the request: the peer is told to drop it."""
        outbox, pending = self._open()
        future = asyncio.get_running_loop().create_future()
        request_id = request.request_id
        pending[request_id] = future
        outbox.put_nowait((request, sent))
        # a timer instead of asyncio.wait_for, and a done callback instead of a task around the
        # wait: the answer wakes its caller directly
        timer = future.get_loop().call_later(timeout, _expire, future)

        def settled(_: asyncio.Future) -> None:
            timer.cancel()
            if pending.pop(request_id, None) is not None:  # unanswered: timed out or cancelled
                outbox.put_nowait((pb.ForwardRequest(request_id=request_id, cancel=True), None))

        future.add_done_callback(settled)
        return future

    async def close(self) -> None:
        """End the stream and wait for its reader: nothing of it may outlive the client (a gRPC
        call collected later, e.g. in a process forked meanwhile, can deadlock there)."""
        self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._call is not None:
            self._call.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call.code(), 1.0)  # the call has ended in gRPC too
        self._call = self._reader = None


class Channels:
    """Cache of grpc.aio channels and Forward streams; create and use only on the coordinator's loop thread."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.ExpertServiceStub]] = {}
        self._streams: dict[str, PeerStream] = {}
        self._relayed: dict[str, RelayedStub] = {}
        self.link: RelayLink | None = None  # libp2p, started when a relayed peer is first called

    def stub(self, endpoint: str, reach: Reach | None = None) -> pb_grpc.ExpertServiceStub | RelayedStub:
        """The stub for a peer at `endpoint`, or reached over libp2p through relays (`reach`)."""
        if reach is not None:
            return self._relayed_stub(reach)
        entry = self._stubs.get(endpoint)
        if entry is None:
            channel = grpc.aio.insecure_channel(endpoint, options=grpc_options(self.max_message_bytes))
            entry = self._stubs[endpoint] = (channel, pb_grpc.ExpertServiceStub(channel))
        return entry[1]

    def _relayed_stub(self, reach: Reach) -> RelayedStub:
        from coordinator.dispatch.relayed import RelayedStub, RelayLink

        stub = self._relayed.get(reach.route)
        if stub is None or stub.reach != reach:  # new, or announced through other relays
            self.link = self.link or RelayLink()
            stub = self._relayed[reach.route] = RelayedStub(self.link, reach, self.max_message_bytes)
        return stub

    def forward(
        self,
        endpoint: str,
        request: pb.ForwardRequest,
        nbytes: int,
        timeout: float,
        sent: asyncio.Future | None = None,
        reach: Reach | None = None,
    ) -> asyncio.Future[pb.ForwardResponse]:
        """One Forward, as a future (cancel it to give up): small ones on the peer's stream (no
        per-call setup), big ones unary (over relays, all on the stream). `sent` (if given)
        resolves once the request is on its way: work the caller does then overlaps the network
        and the peer."""
        if reach is not None:
            endpoint = reach.route
        elif nbytes > STREAM_MAX_BYTES:
            call = asyncio.ensure_future(self.stub(endpoint).Forward(request, timeout=timeout))
            if sent is not None:  # the call's task, scheduled at its creation, sends first
                asyncio.get_running_loop().call_soon(_resolve, sent)
            return call
        stream = self._streams.get(endpoint)
        if stream is None:
            stream = self._streams[endpoint] = PeerStream(self.stub(endpoint, reach))
        return stream.forward(request, timeout, sent)

    async def close(self) -> None:
        for stream in self._streams.values():
            await stream.close()
        self._streams.clear()
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
        self._relayed.clear()
        if self.link is not None:
            await self.link.close()
            self.link = None


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

    async def get(self, endpoint: str, peer_kx: bytes, timeout: float, reach: Reach | None = None) -> ClientSession:
        key = (endpoint, peer_kx.hex())
        session = self._sessions.get(key)
        if session is not None and session.fresh(time.monotonic()):
            return session
        async with self._locks.setdefault(key, asyncio.Lock()):  # concurrent calls share one opening
            session = self._sessions.get(key)
            if session is not None and session.fresh(time.monotonic()):
                return session
            hello, keys = sealed.hello(self.identity, peer_kx)
            accept = await self.channels.stub(endpoint, reach).OpenSession(hello, timeout=timeout)
            if accept.session_id != keys.session_id:
                raise EnvelopeError("peer derived another session id: it does not hold the key it announced")
            session = self._sessions[key] = ClientSession(keys, time.monotonic(), float(accept.ttl_s or 60))
            return session

    def forget(self, endpoint: str, peer_kx: bytes) -> None:
        self._sessions.pop((endpoint, peer_kx.hex()), None)
