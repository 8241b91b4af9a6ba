"""grpc.aio ExpertService: validate every request before compute, then run it on the device.

Status codes are part of the contract: NOT_FOUND (expert not hosted here),
INVALID_ARGUMENT (shape/dtype/bytes wrong), RESOURCE_EXHAUSTED (over a size limit, the
queue or the caller's rate limit), DEADLINE_EXCEEDED (the caller's deadline passed before
the answer), UNAVAILABLE (draining), UNAUTHENTICATED (a seal, signature, session, counter or
timestamp that does not check out; messages stay generic), PERMISSION_DENIED (a caller not
on this private peer's allowlist), INTERNAL (our fault; the message never leaks internals).

Every answer carries a receipt signed by this peer's identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
import torch

from protos import PROTOCOL, __version__, envelope, tensors
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos.envelope import EnvelopeError
from protos.records import PeerState

from ..batcher import DeadlineMissed, MicroBatcher
from ..hellos import HelloRefused
from ..sessions import Session
from . import steps
from .errors import UNPARSABLE, RequestError
from .gate import ADDRESS_SHARE, CallBudget, CallGate, caller_address, client_address
from .settings import Access, Batching, ServiceLimits
from .stream import StreamHandler

if TYPE_CHECKING:
    from ..backends.base import ExpertBackend
    from ..metrics import PeerMetrics

log = logging.getLogger(__name__)


class ExpertServicer(pb_grpc.ExpertServiceServicer):
    def __init__(
        self,
        experts: ExpertBackend,
        *,
        peer_id: str = "",
        limits: ServiceLimits | None = None,
        access: Access | None = None,
        batching: Batching | None = None,
        metrics: PeerMetrics | None = None,
    ) -> None:
        self.experts = experts
        self.peer_id = peer_id
        self.limits = limits or ServiceLimits()
        self.access = access or Access()
        batching = batching or Batching()
        self.state = PeerState.JOINING
        self.load = 0  # token rows admitted and not yet answered (an answer not yet written counts)
        self.load_by_address: dict[str, int] = {}  # the same, per client address
        self.served_requests = 0
        self.served_rows = 0
        # one compute thread per device: the event loop keeps parsing and validating meanwhile
        self._compute = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="expert-compute",
            initializer=_init_compute_thread,
            initargs=(torch.get_num_threads(), batching.compute_cpus),
        )
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="receipt-digest")
        self.batcher = MicroBatcher(experts, self._compute, batching.max_batch_rows, batching.batch_wait_ms)
        self.metrics = metrics
        if metrics is not None:
            self.batcher.on_batch = metrics.batch
        self.budget = CallBudget.derive(
            self.limits.max_rows,
            experts.hidden_dim,
            experts.dtype.itemsize,
            len(experts.uids),
            self.limits.max_message_bytes,
            self.limits.request_memory,
        )
        self.gate = CallGate(self.budget.rpcs_per_address)

    def replace_experts(self, experts: ExpertBackend) -> None:
        """Serve another set of experts (after draining: nothing may be in flight)."""
        if self.load:
            raise RuntimeError(f"cannot switch experts with {self.load} rows in flight")
        self.experts = self.batcher.experts = experts

    def close(self) -> None:
        self.batcher.cancel()
        self._compute.shutdown(wait=True, cancel_futures=True)
        self._hasher.shutdown(wait=True, cancel_futures=True)

    def admissible(
        self, request: pb.ForwardRequest | None, deadline: float | None, address: str = ""
    ) -> tuple[steps.Segments, int, bytes, Session | None]:
        """(segments, rows, input bytes, session) of a request this peer can take now; RequestError
        otherwise. The session is looked up first, the segment count bounded before any loop."""
        if request is None:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, UNPARSABLE)
        if self.state is not PeerState.ONLINE:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, self.state.refusal)
        session = steps.lookup_session(request, self.access)
        segments, rows, data = steps.validate(request, self.experts, self.limits)
        if deadline is not None and time.monotonic() >= deadline:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before compute")
        if self.load + rows > self.limits.max_queue_rows:
            # refuse at once so the coordinator goes to another replica instead of waiting;
            # queued work, and so memory, stays bounded under any load
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"overloaded: {self.load} rows queued, {rows} more exceed {self.limits.max_queue_rows}",
            )
        share = max(self.limits.max_queue_rows // ADDRESS_SHARE, self.limits.max_rows)  # one full request fits
        if (mine := self.load_by_address.get(address, 0)) + rows > share:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this address holds {mine} rows queued or unsent; {rows} more exceed its share {share}",
            )
        return segments, rows, data, session

    def request_digest(self, header: bytes, plain: bytes) -> asyncio.Future[bytes]:
        """The receipt's request digest: a big one is hashed while the device computes (BLAKE3
        releases the GIL on large inputs), a small one at once (cheaper than a thread hop)."""
        loop = asyncio.get_running_loop()
        if len(plain) >= envelope.DIGEST_OFFLOAD_BYTES:
            return loop.run_in_executor(self._hasher, envelope.digest, header, plain)
        done = loop.create_future()
        done.set_result(envelope.digest(header, plain))
        return done

    async def compute(
        self, x: torch.Tensor, segments: steps.Segments, deadline: float | None
    ) -> tuple[torch.Tensor, float, float]:
        """(outputs, ms queued, ms computing the batch it joined), batched with other requests;
        the backend then settles the answer (backends/base.py)."""
        try:
            out, queue_ms, compute_ms = await self.batcher.submit(x, segments, deadline)
        except DeadlineMissed:
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued") from None
        await self.experts.settle(compute_ms)
        return out, queue_ms, compute_ms

    def admit(self, address: str, rows: int) -> None:
        self.load += rows
        self.load_by_address[address] = self.load_by_address.get(address, 0) + rows

    def release(self, address: str, rows: int) -> None:
        """Rows whose answer is written (or that failed): they leave the peer's load."""
        self.load -= rows
        left = self.load_by_address.get(address, 0) - rows
        if left > 0:
            self.load_by_address[address] = left
        else:
            self.load_by_address.pop(address, None)

    async def serve_request(
        self, request: pb.ForwardRequest | None, address: str, deadline: float | None, held: list[int] | None = None
    ) -> pb.ForwardResponse:
        """One Forward, however it arrived; RequestError when refused. `address` is the caller's
        network address (rate limits); `deadline` is a time.monotonic() after which the answer is
        useless. With `held`, an answered request's rows stay in the load, appended to `held`,
        until the caller has written the answer and calls `release`."""
        admitted = 0
        started = time.perf_counter()
        segments: steps.Segments = []
        status = "CANCELLED"
        try:
            segments, rows, data, session = self.admissible(request, deadline, address)
            x, plain, header = steps.open_inputs(request, segments, data, address, self.access, session)
            del data  # the sealed bytes: only the plaintext is needed from here
            admitted = rows
            self.admit(address, admitted)
            digest = self.request_digest(header, plain)
            out, queue_ms, compute_ms = await self.compute(x, segments, deadline)
            if deadline is not None and time.monotonic() >= deadline:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed during compute")
            identity, model_id = self.access.identity, self.experts.model_id
            response = steps.answer(request, header, await digest, out, segments, session, identity, model_id)
            response.queue_ms, response.compute_ms = queue_ms, compute_ms
            self.served_requests += 1
            self.served_rows += admitted
            status = "OK"
            if held is not None:
                held.append(admitted)
                admitted = 0  # released by the caller once the answer is written
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
            self.release(address, admitted)
            self._observe(status, segments, started)

    def _observe(self, status: str, segments: steps.Segments, started: float) -> None:
        if self.metrics is not None:
            self.metrics.answered(status, segments, (time.perf_counter() - started) * 1e3)
            self.metrics.queued_rows.set(self.load)
            self.metrics.sessions.set(len(self.access.sessions))

    async def Forward(self, request: pb.ForwardRequest, context: grpc.aio.ServicerContext) -> pb.ForwardResponse:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            return await self.serve_request(request, client_address(context.peer()), deadline)
        except RequestError as e:
            await context.abort(e.code, str(e))

    async def ForwardStream(
        self, requests: AsyncIterator[pb.ForwardRequest | None], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ForwardResponse]:
        """Many Forwards on one stream, answered as they complete; refusals are answers too."""
        address = client_address(context.peer())
        release = functools.partial(self.release, address)
        stream = StreamHandler(self.serve_request, address, self.limits.max_stream_requests, release)
        async with contextlib.aclosing(stream.run(requests)) as replies:
            async for reply in replies:
                yield reply

    async def OpenSession(self, request: pb.SessionHello, context: grpc.aio.ServicerContext) -> pb.SessionAccept:
        """Cheap checks first (sizes, freshness, the client's key, allowlist, a used hello, the
        address's hello rate), then the signature and the key exchange."""
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNPARSABLE)
        hello = envelope.Hello(
            request.client_identity, request.client_ephemeral, request.timestamp_ms, request.signature
        )
        access, address = self.access, caller_address(context)
        try:
            envelope.precheck_hello(hello)
            if access.allow_clients is not None and request.client_identity not in access.allow_clients:
                raise RequestError(grpc.StatusCode.PERMISSION_DENIED, "this peer only serves allowlisted clients")
            access.hellos.admit(hello.client_ephemeral, address)
            keys = envelope.accept_hello(access.identity, hello)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EnvelopeError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except HelloRefused as e:
            code = grpc.StatusCode.UNAUTHENTICATED if e.replay else grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, str(e))
        except RequestError as e:
            await context.abort(e.code, str(e))
        access.hellos.used(hello.client_ephemeral, hello.timestamp_ms)
        access.sessions.add(keys, request.client_identity, address)
        return pb.SessionAccept(session_id=keys.session_id, ttl_s=int(access.sessions.ttl_s))

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNPARSABLE)
        experts = self.experts
        dtype = tensors.dtype_name(experts.dtype)
        return pb.InfoResponse(
            version=__version__,
            protocol=PROTOCOL,
            peer_id=self.peer_id,
            model_id=experts.model_id,
            experts=[
                pb.ExpertInfo(
                    uid=uid, hidden_dim=experts.hidden_dim, ffn_dim=experts.ffn_dim, dtype=dtype, kind=experts.kind
                )
                for uid in experts.uids
            ],
            max_message_bytes=self.limits.max_message_bytes,
            max_rows=self.limits.max_rows,
            device=str(experts.device),
            state=self.state.value,
            requests_served=self.served_requests,
            rows_served=self.served_rows,
            identity=self.access.identity.public,
            kx_public=self.access.identity.kx_public,
        )


def _init_compute_thread(threads: int, cpus: frozenset[int] | None) -> None:
    # OpenMP thread counts are per thread: the compute thread takes the process's setting.
    # Pinned (--compute-cpus), the expert math keeps its cores to itself, as on a device,
    # and its OpenMP workers inherit the pin.
    torch.set_num_threads(threads)
    if cpus:
        os.sched_setaffinity(0, cpus)
