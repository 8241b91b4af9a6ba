"""Serving through circuit relays: the same ExpertService over libp2p streams, for a peer that
nobody can dial (or one started with --relay always).

The servicer's own handlers answer: OPEN streams carry one SessionHello and get the
servicer's OpenSession answer; FORWARD streams are the servicer's ForwardStream (so
validation, admission, batching, sealing, receipts, refusals and per-client limits are the
ones gRPC callers get; a relayed caller is named by its libp2p peer id). Frames are bounded
by the peer's max message size before a byte is parsed (protos/reach.py); sealing above the
transport keeps the relays blind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from protos import expert_service_pb2 as pb
from protos.plumbing.p2p import start_relayed_node
from protos.reach import (
    ACCEPTED,
    FORWARD,
    INFO,
    MAX_HELLO_BYTES,
    MAX_RELAYS,
    OPEN,
    REFUSED,
    FrameError,
    Reach,
    read_frame,
    write_frame,
)

if TYPE_CHECKING:
    from hivemind.p2p import P2P

    from .service.servicer import ExpertServicer

log = logging.getLogger("moe-peer")
RESERVE_WAIT_S = 15.0  # how long start-up waits for a connection to a relay; also a hello's time limit
START_ATTEMPTS = 3  # a relay briefly unreachable (busy, restarting) is tried again, 1 s then 2 s later
MAX_STREAMS = 256  # relayed streams open at once, from everyone: more are closed unread
StreamHandlerFn = Callable[[object, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class _Context:
    """What the servicer's handlers need of a gRPC context, for a caller over libp2p: its name is
    its libp2p peer id (per-client limits key on it as on a gRPC caller's address)."""

    def __init__(self, remote: object) -> None:
        self._peer = f"p2p:{remote}"

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None  # each streamed request carries its own deadline

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


class RelayedService:
    """This peer's libp2p node and its two stream handlers."""

    def __init__(self, servicer: ExpertServicer, relays: Sequence[str]) -> None:
        self.servicer = servicer
        self.metrics = servicer.metrics
        self.relays = list(relays)[:MAX_RELAYS]
        self.p2p: P2P | None = None
        self.reach: Reach | None = None  # how coordinators reach us, once started
        self.open_streams = 0

    async def start(self) -> Reach:
        if not self.relays:
            raise ConnectionError("no relay to serve through: --initial-peers names no /p2p/ multiaddr")
        self.p2p = await self._start_node()
        await self.p2p.add_binary_stream_handler(OPEN, self._bounded(self._open))
        await self.p2p.add_binary_stream_handler(FORWARD, self._bounded(self._forward))
        await self.p2p.add_binary_stream_handler(INFO, self._bounded(self._info))
        await self._wait_for_relay()
        self.reach = Reach(self.p2p.peer_id.to_base58(), tuple(self.relays))
        return self.reach

    async def _start_node(self) -> P2P:
        from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return await start_relayed_node(self.relays)
            except P2PDaemonError as e:
                if attempt == START_ATTEMPTS:
                    raise ConnectionError(f"could not reach any relay of {self.relays}: {e}") from None
                log.warning("no relay answered (%s); trying again in %d s", str(e).splitlines()[-1], attempt)
                await asyncio.sleep(attempt)
        raise AssertionError("unreachable")

    async def _wait_for_relay(self) -> None:
        ids = {r.rsplit("/p2p/", 1)[-1] for r in self.relays}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESERVE_WAIT_S
        while loop.time() < deadline:
            if any(p.peer_id.to_base58() in ids for p in await self.p2p.list_peers()):
                await asyncio.sleep(0.5)  # the reservation follows the connection at once
                return
            await asyncio.sleep(0.2)
        raise ConnectionError(f"could not connect to any relay of {self.relays} within {RESERVE_WAIT_S:.0f}s")

    async def _open(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer):
            try:
                data = await asyncio.wait_for(read_frame(reader, MAX_HELLO_BYTES), RESERVE_WAIT_S)
                try:
                    hello = pb.SessionHello.FromString(data or b"")
                except DecodeError:
                    hello = None
                try:
                    accept = await self.servicer.OpenSession(hello, _Context(getattr(info, "peer_id", "?")))
                    reply = ACCEPTED + accept.SerializeToString()
                except _Aborted as e:
                    reply = REFUSED + pb.Refusal(code=e.code.value[0], message=str(e)).SerializeToString()
                write_frame(writer, reply)
                await writer.drain()
            except (FrameError, ConnectionError, TimeoutError, asyncio.IncompleteReadError):
                return

    async def _info(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer):
            reply = await self.servicer.Info(pb.InfoRequest(), _Context(getattr(info, "peer_id", "?")))
            with contextlib.suppress(ConnectionError):
                write_frame(writer, reply.SerializeToString())
                await writer.drain()

    async def _requests(self, reader: asyncio.StreamReader) -> AsyncIterator[pb.ForwardRequest | None]:
        limit = self.servicer.limits.max_message_bytes
        while (data := await read_frame(reader, limit)) is not None:
            try:
                request = pb.ForwardRequest.FromString(data)
            except DecodeError:
                request = None
            if self.metrics is not None:
                self.metrics.relayed_bytes.labels("in").inc(len(data))
                if request is not None and not request.cancel:
                    self.metrics.relayed_requests.inc()
            yield request

    async def _forward(self, info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = _Context(getattr(info, "peer_id", "?"))
        with contextlib.closing(writer):
            try:
                replies = self.servicer.ForwardStream(self._requests(reader), context)
                async with contextlib.aclosing(replies):
                    async for reply in replies:
                        data = reply.SerializeToString()
                        if self.metrics is not None:
                            self.metrics.relayed_bytes.labels("out").inc(len(data))
                        write_frame(writer, data)
                        await writer.drain()
            except (FrameError, ConnectionError, asyncio.IncompleteReadError) as e:
                log.debug("relayed stream from %s ended: %s", context.peer(), e)

    def _bounded(self, handler: StreamHandlerFn) -> StreamHandlerFn:
        """`handler` for at most MAX_STREAMS streams at once: more are closed unread."""

        async def run(info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self.open_streams >= MAX_STREAMS:
                log.warning("%d relayed streams open: closing a new one unread", self.open_streams)
                writer.close()
                return
            self.open_streams += 1
            try:
                await handler(info, reader, writer)
            finally:
                self.open_streams -= 1

        return run

    async def close(self) -> None:
        if self.p2p is not None:
            await self.p2p.shutdown()
            self.p2p = None


async def serve_relayed(servicer: ExpertServicer, initial_peers: Sequence[str], why: str) -> RelayedService:
    """Serve through the swarm's relays (its initial peers) over libp2p, and say why in the log."""
    relayed = RelayedService(servicer, [p for p in initial_peers if "/p2p/" in p])
    reach = await relayed.start()
    log.info("%s: serving through relay %s as libp2p peer %s", why, " ".join(reach.relays), reach.peer)
    return relayed
