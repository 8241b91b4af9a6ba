"""A relayed peer (loopback, `--relay always`) refuses hostile libp2p streams and keeps serving."""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
import torch

from coordinator.client import SwarmClient
from coordinator.dispatch.relayed import RelayedStub, RelayLink
from coordinator.sim.local_swarm import LocalSwarm
from protos import expert_service_pb2 as pb
from protos.reach import FORWARD, OPEN, REFUSED, Reach, read_frame, write_frame


@pytest.fixture(scope="module")
def relayed(tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("relayed")) as swarm:
        swarm.start_bootstrap()
        proc = swarm.start_peer("home", "--seed", "0", "--hidden", "16", "--ffn", "16", "--relay", "always")
        peer_id = re.search(r"as libp2p peer (\w+)", proc.log_path.read_text()).group(1)
        yield swarm, proc, Reach(peer_id, tuple(swarm.initial_peers))


async def hostile(reach: Reach) -> dict[str, object]:
    link = RelayLink()
    try:
        out = {}
        reader, writer = await link.open(reach, FORWARD)  # a frame claiming a terabyte: closed unread
        writer.write((1 << 40).to_bytes(8, "big"))
        await writer.drain()
        out["huge"] = await asyncio.wait_for(reader.read(), 30)
        reader, writer = await link.open(reach, FORWARD)  # bytes that are no ForwardRequest: refused
        write_frame(writer, b"\xff\xfe not a protobuf")
        await writer.drain()
        out["garbage"] = pb.ForwardResponse.FromString(await asyncio.wait_for(read_frame(reader, 1 << 20), 30))
        writer.close()
        reader, writer = await link.open(reach, OPEN)  # a hello that does not parse
        write_frame(writer, b"\xff\xfe")
        await writer.drain()
        out["hello"] = await asyncio.wait_for(read_frame(reader, 4096), 30)
        try:  # a well-formed but forged hello
            await RelayedStub(link, reach).OpenSession(pb.SessionHello(client_identity=b"x" * 32), timeout=30)
        except grpc.aio.AioRpcError as e:
            out["forged"] = e.code()
        out["info"] = await RelayedStub(link, reach).Info(pb.InfoRequest(), timeout=30)
        return out
    finally:
        await link.close()


def test_hostile_streams_are_refused_and_the_peer_keeps_serving(relayed):
    swarm, proc, reach = relayed
    out = asyncio.run(hostile(reach))
    assert out["huge"] == b""
    assert out["garbage"].refusal.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert out["hello"][:1] == REFUSED
    assert pb.Refusal.FromString(out["hello"][1:]).code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert out["forged"] in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)
    assert proc.alive()
    assert [e.uid for e in out["info"].experts] == proc.info["experts"]  # Info over the relay, as over gRPC
    uids = proc.info["experts"]
    with SwarmClient(swarm.initial_peers, uids, timeout=20) as client:  # and it still serves, sealed
        client.wait_for_experts(timeout=60)
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
        result = client.dispatch(x, torch.tensor([[0, 1]] * 4), uids[:8], torch.float32)
        assert result.answered.all()
    assert "Traceback" not in proc.log_path.read_text()
