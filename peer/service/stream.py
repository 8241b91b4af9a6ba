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

# serve_request(request, client, deadline): one Forward's answer, or RequestError
ServeRequest = Callable[[pb.ForwardRequest, str, float | None], Awaitable[pb.ForwardResponse]]


def stream_deadline(request: pb.ForwardRequest, now: float | None = None) -> float | None:
    """A streamed request's deadline on this peer's monotonic clock: the budget its sender
    sealed in (deadline_ms - timestamp_ms), counted from arrival, so clock skew cannot stretch
    or cut it. None when the request carries no deadline."""
    if not request.deadline_ms:
        return None
    budget_s = max(request.deadline_ms - request.timestamp_ms, 0) / 1e3
    return (time.monotonic() if now is None else now) + min(budget_s, MAX_STREAM_BUDGET_S)


class StreamHandler:
    """One ForwardStream call: the replies to send and the requests in flight."""

    def __init__(self, serve_request: ServeRequest, client: str, max_requests: int) -> None:
        self.serve_request = serve_request
        self.client = client
        self.max_requests = max_requests
        self.replies: asyncio.Queue[pb.ForwardResponse | None] = asyncio.Queue()
        self.running: dict[str, asyncio.Task] = {}

    async def run(self, requests: AsyncIterator[pb.ForwardRequest | None]) -> AsyncIterator[pb.ForwardResponse]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while (reply := await self.replies.get()) is not None:
                yield reply
            await reader  # surfaces a failed read (e.g. the stream broke)
        finally:
            reader.cancel()
            for task in list(self.running.values()):
                task.cancel()

    def refuse(self, request_id: str, code: grpc.StatusCode, message: str) -> None:
        refusal = pb.Refusal(code=code.value[0], message=message)
        self.replies.put_nowait(pb.ForwardResponse(request_id=request_id, refusal=refusal))

    async def _one(self, request: pb.ForwardRequest) -> None:
        try:
            self.replies.put_nowait(await self.serve_request(request, self.client, stream_deadline(request)))
        except RequestError as e:
            self.refuse(request.request_id, e.code, str(e))
        finally:
            self.running.pop(request.request_id, None)

    async def _read(self, requests: AsyncIterator[pb.ForwardRequest | None]) -> None:
        try:
            await self._read_all(requests)
        finally:
            self.replies.put_nowait(None)  # ends the reply loop, also when reading failed

    async def _read_all(self, requests: AsyncIterator[pb.ForwardRequest | None]) -> None:
        async for request in requests:
            if request is None:
                self.refuse("", grpc.StatusCode.INVALID_ARGUMENT, UNPARSABLE)
            elif request.cancel:
                if (task := self.running.get(request.request_id)) is not None:
                    task.cancel()  # queued work of a cancelled request is dropped before compute
            elif request.request_id in self.running:
                self.refuse(request.request_id, grpc.StatusCode.INVALID_ARGUMENT, "request_id already in flight")
            elif len(self.running) >= self.max_requests:
                self.refuse(
                    request.request_id,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{len(self.running)} requests in flight on this stream; the limit is {self.max_requests}",
                )
            else:
                self.running[request.request_id] = asyncio.create_task(self._one(request))
        # the client is done sending: answer what is in flight, then end the stream
        await asyncio.gather(*self.running.values(), return_exceptions=True)
