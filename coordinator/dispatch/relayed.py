"""Calls to relayed peers over libp2p, shaped like the gRPC stub's so that everything above the
transport (streams, sessions, hedging, retries, bans) is the same code for both kinds of peer.

A RelayedStub answers OpenSession, ForwardStream and Info like pb_grpc.ExpertServiceStub, and fails
with the AioRpcError a gRPC call would have raised: UNAVAILABLE when no relay gets through, the
peer's own status for its refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from coordinator.dispatch.transport import rpc_error
from protos import expert_service_pb2 as pb
from protos.limits import DEFAULT_MAX_MESSAGE_BYTES
from protos.plumbing.p2p import start_dialing_node
from protos.reach import (
    ACCEPTED,
    FORWARD,
    INFO,
    MAX_HELLO_BYTES,
    MAX_INFO_BYTES,
    OPEN,
    FrameError,
    Reach,
    circuit_addr,
    read_frame,
    write_frame,
)

_LINK_ERRORS = (ConnectionError, OSError, asyncio.IncompleteReadError, FrameError, DecodeError)


LINK_LOST = "relayed connection lost"  # the detail of every failure of the libp2p link itself


def _unavailable(e: BaseException) -> grpc.aio.AioRpcError:
    return rpc_error(grpc.StatusCode.UNAVAILABLE, f"{LINK_LOST}: {type(e).__name__}: {e}"[:300])


def relay_dropped(e: grpc.aio.AioRpcError) -> bool:
    """The relayed link failed (not the peer): worth one more try on a new connection."""
    return e.code() == grpc.StatusCode.UNAVAILABLE and (e.details() or "").startswith(LINK_LOST)


class RelayLink:
    """This coordinator's libp2p node, started on first use; loop thread only."""

    def __init__(self) -> None:
        self._p2p = None
        self._starting: asyncio.Lock | None = None
        self.streams_opened = 0

    async def _node(self):  # -> hivemind P2P
        if self._p2p is not None and not self._p2p.is_alive:  # its daemon died: start another
            self._p2p = None
        if self._p2p is None:
            self._starting = self._starting or asyncio.Lock()
            async with self._starting:
                if self._p2p is None:
                    self._p2p = await start_dialing_node()
        return self._p2p

    async def open(self, reach: Reach, protocol: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to the relayed peer, dialled through its relays when not connected already;
        ConnectionError when neither works (the daemon's own errors are no concern of callers)."""
        from hivemind.p2p import PeerID

        try:
            p2p = await self._node()
            peer = PeerID.from_base58(reach.peer)
            try:
                _, reader, writer = await p2p.call_binary_stream_handler(peer, protocol)
            except Exception:  # not connected (or the connection dropped): dial through the relays, once
                await p2p._client.connect(peer, [circuit_addr(r) for r in reach.relays])
                _, reader, writer = await p2p.call_binary_stream_handler(peer, protocol)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:
            raise ConnectionError(f"no relay got through to {reach.peer[-8:]}: {str(e).strip()[:200]}") from None
        self.streams_opened += 1
        return reader, writer

    async def connections(self, reach: Reach) -> list[str]:
        """The addresses this node is connected to the peer at (relayed ones end /p2p-circuit)."""
        if self._p2p is None:
            return []
        return [str(a) for p in await self._p2p.list_peers() if p.peer_id.to_base58() == reach.peer for a in p.addrs]

    async def close(self) -> None:
        if self._p2p is not None:
            await self._p2p.shutdown()
            self._p2p = None


class RelayedCall:
    """One ForwardStream over a libp2p stream: iterate it for the answers (PeerStream's reader)."""

    def __init__(self, link: RelayLink, reach: Reach, requests: AsyncIterator[pb.ForwardRequest], limit: int) -> None:
        self._link, self._reach, self._requests, self._limit = link, reach, requests, limit
        self._writer: asyncio.StreamWriter | None = None
        self._sending: asyncio.Task | None = None
        self._done = asyncio.get_running_loop().create_future()

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(*_LINK_ERRORS):
            async for request in self._requests:
                write_frame(writer, request.SerializeToString())
                await writer.drain()
            writer.write_eof()

    async def __aiter__(self) -> AsyncIterator[pb.ForwardResponse]:
        try:
            reader, self._writer = await self._link.open(self._reach, FORWARD)
            self._sending = asyncio.create_task(self._send(self._writer))
            while (data := await read_frame(reader, self._limit)) is not None:
                yield pb.ForwardResponse.FromString(data)
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"{LINK_LOST}: the stream ended")
        except grpc.aio.AioRpcError:
            raise
        except _LINK_ERRORS as e:
            raise _unavailable(e) from None
        finally:
            self.cancel()

    def cancel(self) -> None:
        if self._sending is not None:
            self._sending.cancel()
        if self._writer is not None:
            self._writer.close()
        if not self._done.done():
            self._done.set_result(grpc.StatusCode.CANCELLED)

    async def code(self) -> grpc.StatusCode:
        return await self._done


class RelayedStub:
    """The ExpertServiceStub calls the dispatcher makes, for one relayed peer."""

    def __init__(self, link: RelayLink, reach: Reach, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.link, self.reach, self.max_message_bytes = link, reach, max_message_bytes

    def ForwardStream(self, requests: AsyncIterator[pb.ForwardRequest]) -> RelayedCall:
        return RelayedCall(self.link, self.reach, requests, self.max_message_bytes)

    async def Info(self, request: pb.InfoRequest, timeout: float) -> pb.InfoResponse:
        try:
            return await asyncio.wait_for(self._info(), timeout)
        except TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "relayed Info timed out") from None
        except _LINK_ERRORS as e:
            raise _unavailable(e) from None

    async def _info(self) -> pb.InfoResponse:
        reader, writer = await self.link.open(self.reach, INFO)
        with contextlib.closing(writer):
            data = await read_frame(reader, MAX_INFO_BYTES)
        if data is None:
            raise ConnectionError("the relayed peer closed the stream without answering")
        return pb.InfoResponse.FromString(data)

    async def OpenSession(self, hello: pb.SessionHello, timeout: float) -> pb.SessionAccept:
        try:
            return await asyncio.wait_for(self._open_session(hello), timeout)
        except TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "opening a relayed session timed out") from None
        except _LINK_ERRORS as e:
            raise _unavailable(e) from None

    async def _open_session(self, hello: pb.SessionHello) -> pb.SessionAccept:
        reader, writer = await self.link.open(self.reach, OPEN)
        with contextlib.closing(writer):
            write_frame(writer, hello.SerializeToString())
            await writer.drain()
            data = await read_frame(reader, MAX_HELLO_BYTES)
        if not data:
            raise ConnectionError("the relayed peer closed the stream without answering")
        if data[:1] == ACCEPTED:
            return pb.SessionAccept.FromString(data[1:])
        refusal = pb.Refusal.FromString(data[1:])
        code = next((c for c in grpc.StatusCode if c.value[0] == refusal.code), grpc.StatusCode.UNKNOWN)
        raise rpc_error(code, refusal.message[:300])
