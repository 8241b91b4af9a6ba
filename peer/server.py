"""grpc.aio ExpertService: validate every request before compute, then run it on the device.

Status codes are part of the contract: NOT_FOUND (expert not hosted here),
INVALID_ARGUMENT (shape/dtype/bytes wrong), RESOURCE_EXHAUSTED (over a size limit, the
queue or the caller's rate limit), DEADLINE_EXCEEDED (the caller's deadline passed before
the answer), UNAVAILABLE (draining), UNAUTHENTICATED (a seal, signature, session, counter or
timestamp that does not check out; messages stay generic), PERMISSION_DENIED (a caller not
on this private peer's allowlist), INTERNAL (our fault; the message never leaks internals).

Sealed requests are opened only after every cheap check passed, and their counter is
marked used only once the payload authenticated, so forgeries cannot burn a session's
counters. Every answer carries a receipt signed by this peer's identity.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
import torch
from google.protobuf.message import DecodeError

from protos import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_QUEUE_ROWS,
    DEFAULT_MAX_ROWS,
    PROTOCOL,
    __version__,
    envelope,
    grpc_options,
    tensors,
)
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos.envelope import EnvelopeError, Identity
from protos.records import PeerState

from .batcher import DeadlineMissed, MicroBatcher
from .sessions import RateLimiter, Session, SessionTable

if TYPE_CHECKING:
    from .experts import HostedExperts
    from .hf_experts import HFHostedExperts
    from .impair import Impairment
    from .metrics import PeerMetrics

log = logging.getLogger(__name__)
UNPARSABLE = "request bytes are not a valid protobuf message of this method"
MAX_STREAM_BUDGET_S = 600.0  # a streamed request's deadline is capped: no work waits longer
DEFAULT_MAX_STREAM_REQUESTS = 256  # in flight on one stream (rows are bounded by admission control)


class RequestError(Exception):
    """A request refused before compute, with the status the caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ExpertServicer(pb_grpc.ExpertServiceServicer):
    def __init__(
        self,
        experts: HostedExperts | HFHostedExperts,
        *,
        peer_id: str = "",
        max_rows: int = DEFAULT_MAX_ROWS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_queue_rows: int = DEFAULT_MAX_QUEUE_ROWS,
        max_batch_rows: int = 4096,
        batch_wait_ms: float = 0.0,
        impairment: Impairment | None = None,
        identity: Identity | None = None,
        allow_plaintext: bool = False,
        allow_clients: frozenset[bytes] | None = None,
        rate_limiter: RateLimiter | None = None,
        sessions: SessionTable | None = None,
        corrupt_outputs: float = 0.0,
        metrics: PeerMetrics | None = None,
        compute_cpus: frozenset[int] | None = None,
        max_stream_requests: int = DEFAULT_MAX_STREAM_REQUESTS,
    ) -> None:
        self.experts = experts
        self.identity = identity or Identity.generate()
        self.allow_plaintext = allow_plaintext  # unsealed requests: benchmarks and trusted networks only
        self.allow_clients = allow_clients  # None: a public peer
        self.rate_limiter = rate_limiter
        self.sessions = sessions or SessionTable()
        self.corrupt_outputs = corrupt_outputs  # a cheating peer, for tests of spot checks only
        self.impairment = impairment  # simulated slow device / network, for `moe-swarm simulate` only
        self.peer_id = peer_id
        self.max_rows = max_rows
        self.max_queue_rows = max_queue_rows  # admission control: rows admitted and not yet answered
        self.max_message_bytes = max_message_bytes
        self.max_stream_requests = max_stream_requests
        self.state = PeerState.JOINING
        self.load = 0  # token rows admitted and not yet answered
        self.served_requests = 0
        self.served_rows = 0
        # one compute thread per device: the event loop keeps parsing and validating meanwhile
        self._compute = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="expert-compute",
            initializer=_init_compute_thread,
            initargs=(torch.get_num_threads(), compute_cpus),
        )
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="receipt-digest")
        self.batcher = MicroBatcher(experts, self._compute, max_batch_rows, batch_wait_ms)
        self.metrics = metrics
        if metrics is not None:
            self.batcher.on_batch = metrics.batch

    def replace_experts(self, experts: HostedExperts | HFHostedExperts) -> None:
        """Serve another set of experts (after draining: nothing may be in flight)."""
        if self.load:
            raise RuntimeError(f"cannot switch experts with {self.load} rows in flight")
        self.experts = self.batcher.experts = experts

    def close(self) -> None:
        self.batcher.cancel()
        self._compute.shutdown(wait=True, cancel_futures=True)
        self._hasher.shutdown(wait=True, cancel_futures=True)

    def validate(self, request: pb.ForwardRequest) -> tuple[list[tuple[str, int]], int, bytes]:
        """(segments, rows, the input bytes): every cheap check before any crypto or compute."""
        if not request.segments:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "request has no segments")
        segments = []
        for seg in request.segments:
            if seg.expert_uid not in self.experts.slots:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"expert {seg.expert_uid!r} is not hosted here")
            if seg.num_rows == 0:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"segment {seg.expert_uid!r} has 0 rows")
            segments.append((seg.expert_uid, seg.num_rows))
        rows = sum(r for _, r in segments)
        if rows > self.max_rows:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"request carries {rows} rows; this peer takes <= {self.max_rows}"
            )
        hidden = self.experts.hidden_dim
        want_dtype = tensors.dtype_name(self.experts.dtype)
        inp = request.inputs
        if inp.dtype != want_dtype:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"inputs dtype is {inp.dtype!r}; these experts take {want_dtype!r}"
            )
        if list(inp.shape) != [rows, hidden]:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"inputs shape is {list(inp.shape)}; segments need [{rows}, {hidden}]",
            )
        try:
            _, _, expected = tensors.check_header(inp, max_bytes=self.max_message_bytes)
        except tensors.TensorCodecError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        sealed = bool(request.session_id)
        data = inp.data  # read once: every read of a protobuf bytes field is a fresh copy
        if len(data) != expected + (envelope.TAG_LEN if sealed else 0):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"inputs carry {len(data)} bytes; shape {list(inp.shape)} {inp.dtype} needs {expected}"
                + (f" + {envelope.TAG_LEN} (seal tag)" if sealed else ""),
            )
        return segments, rows, data

    def open_inputs(
        self, request: pb.ForwardRequest, segments: list[tuple[str, int]], data: bytes, client: str
    ) -> tuple[torch.Tensor, bytes, bytes, Session | None]:
        """The plaintext inputs (as a tensor and as bytes), the request header they were bound
        to, and the session."""
        inp = request.inputs
        header = envelope.request_header(
            request.session_id,
            request.request_id,
            request.counter,
            request.timestamp_ms,
            request.deadline_ms,
            segments,
            inp.dtype,
            inp.shape,
        )
        session = None
        if not request.session_id:
            if not self.allow_plaintext:
                raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "this peer only takes sealed requests")
            if self.allow_clients is not None:
                raise RequestError(grpc.StatusCode.PERMISSION_DENIED, "this peer only serves allowlisted clients")
            plaintext = data
        else:
            session = self.sessions.get(request.session_id)
            if session is None:
                raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "unknown or expired session")
            try:
                envelope.check_fresh(request.timestamp_ms)
                plaintext = envelope.open_sealed(session.keys.to_peer, request.counter, data, header)
            except EnvelopeError as e:
                raise RequestError(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
            if not session.window.accept(request.counter):
                raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "replayed or too old counter")
            client = session.client
        rows = sum(r for _, r in segments)
        if self.rate_limiter is not None and not self.rate_limiter.allow(client, rows):
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit for this client exceeded")
        dtype = tensors.dtype_from_name(inp.dtype)
        return tensors.from_bytes(plaintext, dtype, tuple(inp.shape)), plaintext, header, session

    def answer(
        self,
        request: pb.ForwardRequest,
        header: bytes,
        request_digest: bytes,
        out: torch.Tensor,
        segments: list[tuple[str, int]],
        session: Session | None,
    ) -> pb.ForwardResponse:
        """The response: outputs (sealed when the request was) and the signed receipt."""
        dtype, shape, data = tensors.payload(out)
        out_header = envelope.response_header(header, dtype, shape)
        statement = envelope.receipt_statement(
            request_digest,
            envelope.digest(out_header, data),
            [u for u, _ in segments],
            self.experts.model_id,
        )
        # sealing writes new bytes; plaintext is copied out of the tensor (a field takes bytes only)
        if session is not None:
            data = envelope.seal(session.keys.to_client, request.counter, data, out_header)
        else:
            data = bytes(data)
        response = pb.ForwardResponse(request_id=request.request_id, receipt=self.identity.sign(statement))
        # fields set in place: a Tensor built apart would be copied again into the response
        response.outputs.dtype = dtype
        response.outputs.shape.extend(shape)
        response.outputs.data = data
        return response

    async def serve_request(
        self, request: pb.ForwardRequest | None, client: str, deadline: float | None
    ) -> pb.ForwardResponse:
        """One Forward, however it arrived; RequestError when refused. `client` names a plaintext
        caller (rate limits); `deadline` is a time.monotonic() after which the answer is useless."""
        admitted = 0
        started = time.perf_counter()
        segments: list[tuple[str, int]] = []
        status = "CANCELLED"
        try:
            if request is None:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, UNPARSABLE)
            if self.state is not PeerState.ONLINE:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, f"peer is {self.state.value}")
            segments, rows, data = self.validate(request)
            if deadline is not None and time.monotonic() >= deadline:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before compute")
            if self.load + rows > self.max_queue_rows:
                # refuse at once so the coordinator goes to another replica instead of waiting;
                # queued work, and so memory, stays bounded under any load
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"overloaded: {self.load} rows queued, {rows} more exceed {self.max_queue_rows}",
                )
            x, plain, header, session = self.open_inputs(request, segments, data, client)
            del data  # the sealed bytes: only the plaintext is needed from here
            admitted = rows
            self.load += admitted
            # the receipt's request digest: a big one is hashed while the device computes (BLAKE3
            # releases the GIL on large inputs), a small one at once (cheaper than a thread hop)
            if len(plain) >= envelope.DIGEST_OFFLOAD_BYTES:
                request_digest = asyncio.get_running_loop().run_in_executor(
                    self._hasher, envelope.digest, header, plain
                )
            else:
                request_digest = asyncio.get_running_loop().create_future()
                request_digest.set_result(envelope.digest(header, plain))
            try:
                out, queue_ms, compute_ms = await self.batcher.submit(x, segments, deadline)
            except DeadlineMissed:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued") from None
            if self.impairment is not None:
                await self.impairment.apply(compute_ms)
            if self.corrupt_outputs:
                out = out * (1 + self.corrupt_outputs)  # signed as if honest: only a comparison can tell
            if deadline is not None and time.monotonic() >= deadline:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed during compute")
            response = self.answer(request, header, await request_digest, out, segments, session)
            response.queue_ms, response.compute_ms = queue_ms, compute_ms
            self.served_requests += 1
            self.served_rows += admitted
            status = "OK"
            return response
        except RequestError as e:
            status = e.code.name
            raise
        except asyncio.CancelledError:
            raise  # the client went away or its deadline fired: nothing to answer
        except Exception as e:
            log.exception("Forward failed")
            status = "INTERNAL"
            raise RequestError(grpc.StatusCode.INTERNAL, "internal error while computing experts") from e
        finally:
            self.load -= admitted
            if self.metrics is not None:
                self.metrics.answered(status, segments, (time.perf_counter() - started) * 1e3)
                self.metrics.queued_rows.set(self.load)
                self.metrics.sessions.set(len(self.sessions))

    async def Forward(self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext) -> pb.ForwardResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            return await self.serve_request(request, context.peer(), deadline)
        except RequestError as e:
            await context.abort(e.code, str(e))

    async def ForwardStream(
        self, requests: AsyncIterator[pb.ForwardRequest | None], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ForwardResponse]:
        """Many Forwards on one stream, answered as they complete; refusals are answers too."""
        replies: asyncio.Queue[pb.ForwardResponse | None] = asyncio.Queue()
        running: dict[str, asyncio.Task] = {}
        client = context.peer()

        def refuse(request_id: str, code: grpc.StatusCode, message: str) -> None:
            refusal = pb.Refusal(code=code.value[0], message=message)
            replies.put_nowait(pb.ForwardResponse(request_id=request_id, refusal=refusal))

        async def one(request: pb.ForwardRequest) -> None:
            try:
                replies.put_nowait(await self.serve_request(request, client, stream_deadline(request)))
            except RequestError as e:
                refuse(request.request_id, e.code, str(e))
            finally:
                running.pop(request.request_id, None)

        async def read() -> None:
            try:
                await read_all()
            finally:
                replies.put_nowait(None)  # ends the reply loop below, also when reading failed

        async def read_all() -> None:
            async for request in requests:
                if request is None:
                    refuse("", grpc.StatusCode.INVALID_ARGUMENT, UNPARSABLE)
                elif request.cancel:
                    if (task := running.get(request.request_id)) is not None:
                        task.cancel()  # queued work of a cancelled request is dropped before compute
                elif request.request_id in running:
                    refuse(request.request_id, grpc.StatusCode.INVALID_ARGUMENT, "request_id already in flight")
                elif len(running) >= self.max_stream_requests:
                    refuse(
                        request.request_id,
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{len(running)} requests in flight on this stream; the limit is {self.max_stream_requests}",
                    )
                else:
                    running[request.request_id] = asyncio.create_task(one(request))
            # the client is done sending: answer what is in flight, then end the stream
            await asyncio.gather(*running.values(), return_exceptions=True)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # surfaces a failed read (e.g. the stream broke)
        finally:
            reader.cancel()
            for task in list(running.values()):
                task.cancel()

    async def OpenSession(self, request: pb.SessionHello, context: grpc.aio.ServicerContext) -> pb.SessionAccept:
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNPARSABLE)
        hello = envelope.Hello(
            request.client_identity, request.client_ephemeral, request.timestamp_ms, request.signature
        )
        try:
            if self.allow_clients is not None and request.client_identity not in self.allow_clients:
                raise RequestError(grpc.StatusCode.PERMISSION_DENIED, "this peer only serves allowlisted clients")
            keys = envelope.accept_hello(self.identity, hello)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EnvelopeError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except RequestError as e:
            await context.abort(e.code, str(e))
        self.sessions.add(keys, request.client_identity)
        return pb.SessionAccept(session_id=keys.session_id, ttl_s=int(self.sessions.ttl_s))

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNPARSABLE)
        dtype = tensors.dtype_name(self.experts.dtype)
        return pb.InfoResponse(
            version=__version__,
            protocol=PROTOCOL,
            peer_id=self.peer_id,
            model_id=self.experts.model_id,
            experts=[
                pb.ExpertInfo(
                    uid=uid,
                    hidden_dim=self.experts.hidden_dim,
                    ffn_dim=self.experts.ffn_dim,
                    dtype=dtype,
                    kind=self.experts.kind,
                )
                for uid in self.experts.uids
            ],
            max_message_bytes=self.max_message_bytes,
            max_rows=self.max_rows,
            device=str(self.experts.device),
            state=self.state.value,
            requests_served=self.served_requests,
            rows_served=self.served_rows,
            identity=self.identity.public,
            kx_public=self.identity.kx_public,
        )


def stream_deadline(request: pb.ForwardRequest, now: float | None = None) -> float | None:
    """A streamed request's deadline on this peer's monotonic clock: the budget its sender
    sealed in (deadline_ms - timestamp_ms), counted from arrival, so clock skew cannot stretch
    or cut it. None when the request carries no deadline."""
    if not request.deadline_ms:
        return None
    budget_s = max(request.deadline_ms - request.timestamp_ms, 0) / 1e3
    return (time.monotonic() if now is None else now) + min(budget_s, MAX_STREAM_BUDGET_S)


def _init_compute_thread(threads: int, cpus: frozenset[int] | None) -> None:
    # OpenMP thread counts are per thread: the compute thread takes the process's setting.
    # Pinned (--compute-cpus), the expert math keeps its cores to itself, as on a device,
    # and its OpenMP workers inherit the pin.
    torch.set_num_threads(threads)
    if cpus:
        os.sched_setaffinity(0, cpus)


def _lenient(message: type) -> Callable[[bytes], object | None]:
    """A deserializer that answers bytes that are not a valid message with None (the handler
    then refuses with INVALID_ARGUMENT) instead of grpc's generic UNKNOWN."""

    def parse(data: bytes) -> object | None:
        try:
            return message.FromString(data)
        except DecodeError:
            return None

    return parse


def service_handler(servicer: ExpertServicer) -> grpc.GenericRpcHandler:
    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler
    methods = {
        "Forward": (unary, servicer.Forward, pb.ForwardRequest, pb.ForwardResponse),
        "ForwardStream": (stream, servicer.ForwardStream, pb.ForwardRequest, pb.ForwardResponse),
        "Info": (unary, servicer.Info, pb.InfoRequest, pb.InfoResponse),
        "OpenSession": (unary, servicer.OpenSession, pb.SessionHello, pb.SessionAccept),
    }
    return grpc.method_handlers_generic_handler(
        "moe_swarm.v1.ExpertService",
        {
            name: kind(handler, request_deserializer=_lenient(req), response_serializer=resp.SerializeToString)
            for name, (kind, handler, req, resp) in methods.items()
        },
    )


async def start_server(
    servicer: ExpertServicer, host: str, port: int, max_message_bytes: int
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=grpc_options(max_message_bytes))
    server.add_generic_rpc_handlers((service_handler(servicer),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port} (in use or not a local address)")
    await server.start()
    return server, bound
