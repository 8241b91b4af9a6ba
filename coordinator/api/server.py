"""The HTTP side: OpenAI routes on Starlette, answers as JSON or server-sent events.

Each request becomes a Sequence handed to the engine; the engine's events come back through
an asyncio queue. A client that goes away (mid-stream or while waiting for a whole answer)
cancels its sequence at once, so its slot frees at the next token boundary.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from coordinator.api.engine import Engine
from coordinator.api.errors import ApiError
from coordinator.api.params import GenerationRequest, RequestParser
from coordinator.api.sequence import Event, Sequence


@dataclass
class Served:
    """What the gateway serves and how strictly."""

    engine: Engine
    parser: RequestParser
    tokenizer: Any
    eos_ids: frozenset[int]
    coverage: Callable[[], tuple[int, int]]  # (experts with a live replica, experts)
    min_coverage: float = 1.0  # fraction of experts that must have a replica to accept requests
    retry_after: float = 5.0  # seconds a 503 asks the client to wait
    max_body_bytes: int = 1 << 20


class Gateway:
    def __init__(self, served: Served) -> None:
        self.s = served
        self.metrics = served.engine.metrics
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        return Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed})

    # ---- plain routes --------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        name = self.s.parser.names[0]
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "moe-swarm"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        covered, total = self.s.coverage()
        admission = self.s.engine.admission
        status = "draining" if self.s.engine.draining else ("ok" if self._enough(covered, total) else "degraded")
        body = {
            "status": status,
            "experts_covered": covered,
            "experts": total,
            "active": len(admission.active),
            "queued": len(admission.queue),
        }
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- generation ------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions", self.s.parser.completion)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat", self.s.parser.chat)

    async def _generate(self, request: Request, endpoint: str, parse: Callable[[Any], GenerationRequest]) -> Response:
        try:
            body = await self._json(request)
            gen = await run_in_threadpool(parse, body)  # tokenizing: off the event loop
            self._check_swarm()
            seq, events = self._start(gen)
        except ApiError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            return e.response()
        answer = Answer(gen, seq)
        if gen.stream:
            self.metrics.requests.labels(endpoint, "200").inc()
            stream = self._sse(answer, self._events(request, seq, events))
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        response = await self._whole(answer, self._events(request, seq, events))
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    async def _json(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.s.max_body_bytes:
            raise ApiError(413, f"the request body exceeds {self.s.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.s.max_body_bytes:
                raise ApiError(413, f"the request body exceeds {self.s.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def _enough(self, covered: int, total: int) -> bool:
        return covered >= math.ceil(self.s.min_coverage * total)

    def _check_swarm(self) -> None:
        covered, total = self.s.coverage()
        if not self._enough(covered, total):
            raise ApiError(
                503,
                f"the swarm serves {covered} of this model's {total} experts: waiting for peers, retry shortly",
                code="experts_unavailable",
                retry_after=self.s.retry_after,
            )

    def _start(self, gen: GenerationRequest) -> tuple[Sequence, asyncio.Queue[Event]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        sink = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731 - from the engine's thread
        seq = Sequence(gen, self.s.tokenizer, self.s.eos_ids, sink)
        self.s.engine.submit(seq)
        return seq, events

    async def _events(self, request: Request, seq: Sequence, events: asyncio.Queue[Event]) -> AsyncIterator[Event]:
        """The sequence's events until its last; a client that disconnects cancels it at once."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return
                event = get.result()
                yield event
                if event.finish_reason or event.error:
                    return
        finally:
            gone.cancel()
            if not seq.done:
                self.s.engine.cancel(seq)

    async def _whole(self, answer: Answer, events: AsyncIterator[Event]) -> Response:
        text = []
        async for event in events:
            if event.error:
                return event.error.response()
            text.append(event.text)
        if not answer.seq.done:  # the client went away: nobody reads this
            return Response(status_code=499)
        return JSONResponse(answer.whole("".join(text)))

    async def _sse(self, answer: Answer, events: AsyncIterator[Event]) -> AsyncIterator[str]:
        if answer.gen.kind == "chat":
            yield _data(answer.chunk(role=True))
        async for event in events:
            if event.error:
                yield _data(event.error.body())
                break
            if event.text or event.finish_reason:
                yield _data(answer.chunk(event.text, event.finish_reason))
            if event.finish_reason and answer.gen.include_usage:
                yield _data(answer.usage_chunk())
        yield "data: [DONE]\n\n"


class Answer:
    """The OpenAI objects of one request: a whole completion, or its stream chunks."""

    def __init__(self, gen: GenerationRequest, seq: Sequence) -> None:
        self.gen, self.seq = gen, seq
        prefix = "chatcmpl" if gen.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = {"chat": "chat.completion", "completion": "text_completion"}[self.gen.kind]
        if chunk and self.gen.kind == "chat":
            kind += ".chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.gen.model}

    def whole(self, text: str) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.seq.finish_reason, "logprobs": None}
        if self.gen.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(False), "choices": [choice], "usage": self.seq.usage(), "x_moe_swarm": self._honesty()}

    def chunk(self, text: str = "", finish_reason: str | None = None, role: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.gen.kind == "chat":
            choice["delta"] = {"role": "assistant", "content": ""} if role else {"content": text}
        else:
            choice["text"] = text
        out = {**self._head(True), "choices": [choice]}
        if finish_reason:
            out["x_moe_swarm"] = self._honesty()
        return out

    def usage_chunk(self) -> dict:
        return {**self._head(True), "choices": [], "usage": self.seq.usage(), "x_moe_swarm": self._honesty()}

    def _honesty(self) -> dict[str, int]:
        return self.seq.tally.as_dict()


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _not_found(request: Request, exc: Exception) -> Response:
    routes = "/v1/models, /v1/completions, /v1/chat/completions"
    return ApiError(404, f"no route {request.url.path}; see {routes}").response()


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()
