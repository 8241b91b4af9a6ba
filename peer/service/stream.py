"""ForwardStream: many Forwards on one stream, answered as they complete; refusals are
answers too (the stream goes on), a cancel drops queued work, in-flight requests are capped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from protos import expert_service_pb2 as pb

from .errors import UNPARSABLE, RequestError

MAX_STREAM_BUDGET_S = 600.0  # a streamed request's deadline is capped: no work waits longer

# serve_request(request, address, deadline, held): one Forward's answer, or RequestError; `held` gets its rows
ServeRequest = Callable[[pb.ForwardRequest, str, float | None, list[int] | None], Awaitable[pb.ForwardResponse]]


def stream_deadline(request: pb.ForwardRequest, now: float | None = None) -> float | None:
    """A streamed request's deadline on this peer's monotonic clock: the budget its sender
    sealed in (deadline_ms - timestamp_ms), counted from arrival, so clock skew cannot stretch
    or cut it. None when the request carries no deadline."""
    if not request.deadline_ms:
        return None
    budget_s = max(request.deadline_ms - request.timestamp_ms, 0) / 1e3
    return (time.monotonic() if now is None else now) + min(budget_s, MAX_STREAM_BUDGET_S)


class StreamHandler:
    """One ForwardStream call: the replies to send and the requests in flight.

    A request is in flight from the moment it is read until its answer (or refusal) is
    written: unsent answers count. Past `max_requests` in flight, a request is refused at once
    (RESOURCE_EXHAUSTED); past twice that (the refusals are unsent answers too) the stream stops
    reading until answers are written. So a client that never reads its answers pins at most
    2 x `max_requests` of them, and an answer's rows stay in the peer's load until written."""

    def __init__(
        self,
        serve_request: ServeRequest,
        client: str,
        max_requests: int,
        release: Callable[[int], None] | None = None,
    ) -> None:
        """`release(rows)`: called once an answer is written, for the rows serve_request held for
        it; without it, serve_request releases them when it returns."""
        self.serve_request = serve_request
        self.release = release
        self.client = client
        self.max_requests = max_requests
        self.slots = asyncio.Semaphore(2 * max_requests)  # read and unwritten, refusals included
        self.pending = 0  # read and unwritten, refusals included
        self.replies: asyncio.Queue[tuple[pb.ForwardResponse, int] | None] = asyncio.Queue()
        self.running: dict[str, asyncio.Task] = {}

    async def run(self, requests: AsyncIterator[pb.ForwardRequest | None]) -> AsyncIterator[pb.ForwardResponse]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while (item := await self.replies.get()) is not None:
                reply, rows = item
                try:
                    yield reply  # returns once gRPC took the message: written, or flow control let it go
                finally:
                    self._release(rows)
                    self._done()
            await reader  # surfaces a failed read (e.g. the stream broke)
        finally:
            reader.cancel()
            for task in list(self.running.values()):
                task.cancel()
            while not self.replies.empty():  # answers never written leave the load too
                if (item := self.replies.get_nowait()) is not None:
                    self._release(item[1])

    def _release(self, rows: int) -> None:
        if self.release is not None and rows:
            self.release(rows)

    def _done(self) -> None:
        self.pending -= 1
        self.slots.release()

    def refuse(self, request_id: str, code: grpc.StatusCode, message: str) -> None:
        refusal = pb.Refusal(code=code.value[0], message=message)
        self.replies.put_nowait((pb.ForwardResponse(request_id=request_id, refusal=refusal), 0))

    async def _one(self, request: pb.ForwardRequest) -> None:
        held: list[int] | None = [] if self.release is not None else None
        try:
            reply = await self.serve_request(request, self.client, stream_deadline(request), held)
            self.replies.put_nowait((reply, sum(held or ())))
        except RequestError as e:
            self.refuse(request.request_id, e.code, str(e))
        except asyncio.CancelledError:
            self._done()  # cancelled (by the client, or the stream ended): no answer to write
            raise
        finally:
            self.running.pop(request.request_id, None)

    async def _read(self, requests: AsyncIterator[pb.ForwardRequest | None]) -> None:
        try:
            await self._read_all(requests)
        finally:
            self.replies.put_nowait(None)  # ends the reply loop, also when reading failed

    async def _read_all(self, requests: AsyncIterator[pb.ForwardRequest | None]) -> None:
        iterator = aiter(requests)
        while True:
            await self.slots.acquire()  # a full backlog stops the reading here
            try:
                request = await anext(iterator)
            except StopAsyncIteration:
                self.slots.release()
                break
            if request is not None and request.cancel:
                self.slots.release()  # a cancel gets no answer of its own
                if (task := self.running.get(request.request_id)) is not None:
                    task.cancel()  # queued work of a cancelled request is dropped before compute
                continue
            in_flight, self.pending = self.pending, self.pending + 1
            if request is None:
                self.refuse("", grpc.StatusCode.INVALID_ARGUMENT, UNPARSABLE)
            elif request.request_id in self.running:
                self.refuse(request.request_id, grpc.StatusCode.INVALID_ARGUMENT, "request_id already in flight")
            elif in_flight >= self.max_requests:
                self.refuse(
                    request.request_id,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{in_flight} requests in flight on this stream (unsent answers count); the limit is "
                    f"{self.max_requests}",
                )
            else:
                self.running[request.request_id] = asyncio.create_task(self._one(request))
        # the client is done sending: answer what is in flight, then end the stream
        await asyncio.gather(*self.running.values(), return_exceptions=True)
