"""ForwardStream: the same requests as Forward on one long-lived stream, answered as they
complete; refusals are answers (the stream goes on), cancels drop work, limits are explicit."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import grpc
import pytest
import torch

from coordinator.dispatch import sealed
from peer.backends.faults import Impairment, with_faults
from peer.backends.toy import HostedExperts
from peer.service.server import start_server
from peer.service.servicer import ExpertServicer
from peer.service.settings import DEFAULT_MAX_STREAM_REQUESTS, Access, ServiceLimits
from peer.service.stream import stream_deadline
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos import tensors
from protos.envelope import Identity
from protos.limits import grpc_options
from protos.records import PeerState
from protos.toy_model import ToyConfig

from .conftest import TINY, peer
from .sealing import SealedStub

H = TINY.hidden_dim
CPU = torch.device("cpu")


def refusal_code(reply: pb.ForwardResponse) -> grpc.StatusCode | None:
    if not reply.HasField("refusal"):
        return None
    return next(c for c in grpc.StatusCode if c.value[0] == reply.refusal.code)


def test_stream_answers_like_forward_and_goes_on_after_refusals(stub, uid):
    client = SealedStub(stub)
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(11))
    first, second = client.build(uid, x), client.build(uid, x[:2])
    unknown = client.build(uid.rsplit("/", 1)[0] + "/999", x[:1])  # no such expert here
    bad_shape = client.build(uid, x[:3])
    bad_shape.request.inputs.shape[:] = [3, H + 1]
    sent = [first, unknown, bad_shape, second]
    replies = {r.request_id: r for r in stub.ForwardStream(iter([s.request for s in sent]), timeout=30)}

    assert set(replies) == {s.request.request_id for s in sent}
    assert refusal_code(replies[unknown.request.request_id]) == grpc.StatusCode.NOT_FOUND
    assert refusal_code(replies[bad_shape.request.request_id]) == grpc.StatusCode.INVALID_ARGUMENT
    for s, rows in [(first, x), (second, x[:2])]:
        out, _ = sealed.open_response(s, replies[s.request.request_id], client.peer_identity)  # receipt verified
        assert torch.equal(out, client.forward(uid, rows))  # what a unary Forward answers


def test_unparsable_message_on_a_stream_is_refused_and_the_stream_goes_on(swarm, stub, uid):
    client = SealedStub(stub)
    good = client.build(uid, torch.ones(2, H))
    with grpc.insecure_channel(peer(swarm, "peer-a").info["endpoint"], options=grpc_options()) as channel:
        raw = channel.stream_stream(  # bytes as they come, not only ForwardRequests
            "/moe_swarm.v1.ExpertService/ForwardStream",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=pb.ForwardResponse.FromString,
        )
        replies = list(raw(iter([b"\xff\xff\xff", good.request]), timeout=30))
    assert [refusal_code(r) for r in replies if r.request_id == ""] == [grpc.StatusCode.INVALID_ARGUMENT]
    (answer,) = [r for r in replies if r.request_id == good.request.request_id]
    assert sealed.open_response(good, answer, client.peer_identity)[0].shape == (2, H)


def test_stream_deadline_is_the_sealed_budget_from_arrival():
    request = pb.ForwardRequest(timestamp_ms=1_000_000, deadline_ms=1_002_500)
    assert stream_deadline(request, now=50.0) == pytest.approx(52.5)
    assert stream_deadline(pb.ForwardRequest(timestamp_ms=5, deadline_ms=0), now=1.0) is None
    assert stream_deadline(pb.ForwardRequest(timestamp_ms=9, deadline_ms=5), now=1.0) == 1.0  # already past
    assert stream_deadline(pb.ForwardRequest(timestamp_ms=0, deadline_ms=10**12), now=0.0) == 600.0  # capped


async def _in_process_peer(
    impairment: Impairment | None = None,
    identity: Identity | None = None,
    max_stream_requests: int = DEFAULT_MAX_STREAM_REQUESTS,
) -> tuple[grpc.aio.Server, str, ExpertServicer]:
    experts = HostedExperts.from_seed(ToyConfig(num_layers=1, num_experts=2, hidden_dim=8, ffn_dim=8), 0, "*", CPU)
    servicer = ExpertServicer(
        with_faults(experts, impairment),
        access=Access(identity or Identity.generate(), allow_plaintext=True),
        limits=ServiceLimits(max_stream_requests=max_stream_requests),
    )
    servicer.state = PeerState.ONLINE
    server, port = await start_server(servicer, "127.0.0.1", 0, 1 << 20)
    return server, f"127.0.0.1:{port}", servicer


def _plain(request_id: str, uid: str, rows: int = 1, budget_ms: int = 20_000) -> pb.ForwardRequest:
    now = int(time.time() * 1000)
    return pb.ForwardRequest(
        request_id=request_id,
        segments=[pb.Segment(expert_uid=uid, num_rows=rows)],
        inputs=tensors.encode(torch.ones(rows, 8)),
        timestamp_ms=now,
        deadline_ms=now + budget_ms,
    )


def _in_a_fresh_process(scenario):
    """Run an in-process peer scenario in a spawned interpreter: gRPC state left in this test
    process could hang the hivemind DHT processes later tests fork."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(scenario).result(timeout=120)


def _cancel_and_limit_scenario() -> tuple[dict[str, int | None], int]:
    async def scenario() -> tuple[dict[str, int | None], int]:
        # every answer waits 600 ms after compute: requests stay in flight long enough to act on
        server, endpoint, servicer = await _in_process_peer(
            impairment=Impairment(latency_ms=600), max_stream_requests=2
        )
        uid = servicer.experts.uids[0]
        try:
            async with grpc.aio.insecure_channel(endpoint, options=grpc_options()) as channel:
                call = pb_grpc.ExpertServiceStub(channel).ForwardStream(timeout=30)
                for rid in ["a", "b", "over-the-limit"]:
                    await call.write(_plain(rid, uid))
                await asyncio.sleep(0.2)
                await call.write(pb.ForwardRequest(request_id="a", cancel=True))
                await call.done_writing()
                replies = {r.request_id: r.refusal.code if r.HasField("refusal") else None async for r in call}
        finally:
            await server.stop(None)
            servicer.close()
        return replies, servicer.served_requests

    return asyncio.run(scenario())


def test_cancel_drops_a_request_and_the_in_flight_limit_refuses_at_once():
    replies, served = _in_a_fresh_process(_cancel_and_limit_scenario)
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert replies == {"over-the-limit": exhausted, "b": None}  # "a" was cancelled: never answered
    assert served == 1


def _late_request_scenario() -> tuple[int | None, int]:
    async def scenario() -> tuple[int | None, int]:
        server, endpoint, servicer = await _in_process_peer(impairment=Impairment(latency_ms=300))
        uid = servicer.experts.uids[0]
        try:
            async with grpc.aio.insecure_channel(endpoint, options=grpc_options()) as channel:
                call = pb_grpc.ExpertServiceStub(channel).ForwardStream(timeout=30)
                await call.write(_plain("late", uid, budget_ms=100))  # done computing, then 300 ms more
                await call.done_writing()
                (reply,) = [r async for r in call]
        finally:
            await server.stop(None)
            servicer.close()
        return reply.refusal.code if reply.HasField("refusal") else None, servicer.served_requests

    return asyncio.run(scenario())


def test_a_streamed_request_past_its_budget_is_refused_not_computed():
    assert _in_a_fresh_process(_late_request_scenario) == (grpc.StatusCode.DEADLINE_EXCEEDED.value[0], 0)


def _coordinator_stream_scenario() -> dict[str, object]:
    from coordinator.dispatch.transport import Channels

    async def scenario() -> dict[str, object]:
        # answers wait 300 ms after compute: long enough for a caller to give up first
        server, endpoint, servicer = await _in_process_peer(impairment=Impairment(latency_ms=300))
        uid = servicer.experts.uids[0]
        channels = Channels()
        seen: dict[str, object] = {}

        async def code_of(request: pb.ForwardRequest, timeout: float = 10) -> object:
            try:
                reply = await channels.forward(endpoint, request, request.inputs.ByteSize(), timeout)
            except grpc.aio.AioRpcError as e:
                return e.code()
            return tensors.decode(reply.outputs)

        try:
            unary = await channels.stub(endpoint).Forward(_plain("unary", uid, rows=3), timeout=10)
            streamed = await code_of(_plain("streamed", uid, rows=3))
            seen["equal_to_unary"] = torch.equal(streamed, tensors.decode(unary.outputs))
            seen["unknown"] = await code_of(_plain("unknown", uid.rsplit("/", 1)[0] + "/9"))
            seen["gave_up"] = await code_of(_plain("gave-up", uid), timeout=0.1)
            await asyncio.sleep(0.5)  # the cancel reached the peer before its answer was due
            seen["served"] = servicer.served_requests
            pending = asyncio.ensure_future(code_of(_plain("in-flight", uid)))
            await asyncio.sleep(0.1)
            await server.stop(None)  # the stream breaks under a waiting call
            seen["broken"] = await pending
        finally:
            await channels.close()
            await server.stop(None)
            servicer.close()
        return seen

    return asyncio.run(scenario())


def test_coordinator_stream_answers_like_unary_and_fails_like_it():
    seen = _in_a_fresh_process(_coordinator_stream_scenario)
    assert seen["equal_to_unary"]
    assert seen["unknown"] == grpc.StatusCode.NOT_FOUND  # a refusal, raised as the unary error
    assert seen["gave_up"] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seen["served"] == 2  # the unary and streamed calls; the abandoned one was cancelled
    assert seen["broken"] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
