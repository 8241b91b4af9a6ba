"""Bad requests over real gRPC get a precise status, and the peer keeps serving."""

from __future__ import annotations

import grpc
import pytest
import torch

from protos import expert_service_pb2 as pb
from protos import tensors, toy_model
from protos.records import expert_uid

from .conftest import MAX_MESSAGE_BYTES, MAX_ROWS, TINY
from .sealing import SealedStub

H = TINY.hidden_dim


def request(uid: str, x: torch.Tensor, rows: int | None = None) -> pb.ForwardRequest:
    return pb.ForwardRequest(
        request_id="t", segments=[pb.Segment(expert_uid=uid, num_rows=rows or x.shape[0])], inputs=tensors.encode(x)
    )


def status_of(stub, req, timeout: float = 10.0) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(req, timeout=timeout)
    return info.value.code(), info.value.details()


def assert_still_serves(stub, uid):
    out = SealedStub(stub).forward(uid, torch.ones(2, H))
    assert out.shape == (2, H) and torch.isfinite(out).all()


def wrong_bytes(uid):
    req = request(uid, torch.ones(2, H))
    req.inputs.data = req.inputs.data[:-4]
    return req


def wrong_shape(uid):
    req = request(uid, torch.ones(2, H))
    req.inputs.shape[:] = [2, H, 1]
    return req


CASES = {
    "unknown expert": (
        lambda uid: request(expert_uid("toy-0000000000000000", 0, 0), torch.ones(1, H)),
        grpc.StatusCode.NOT_FOUND,
        "not hosted",
    ),
    "expert of another peer": (
        lambda uid: request(uid.rsplit("/", 1)[0] + "/7", torch.ones(1, H)),
        grpc.StatusCode.NOT_FOUND,
        "not hosted",
    ),
    "malformed uid": (lambda uid: request("not-a-uid", torch.ones(1, H)), grpc.StatusCode.NOT_FOUND, "not hosted"),
    "wrong hidden size": (lambda uid: request(uid, torch.ones(2, H + 1)), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    "wrong dtype": (
        lambda uid: request(uid, torch.ones(2, H, dtype=torch.bfloat16)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "dtype",
    ),
    "unknown dtype name": (
        lambda uid: pb.ForwardRequest(
            segments=[pb.Segment(expert_uid=uid, num_rows=1)], inputs=pb.Tensor(dtype="int8", shape=[1, H], data=b"")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "dtype",
    ),
    "rows disagree with segments": (
        lambda uid: request(uid, torch.ones(3, H), rows=2),
        grpc.StatusCode.INVALID_ARGUMENT,
        "shape",
    ),
    "byte length mismatch": (wrong_bytes, grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    "extra dimension": (wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    "no segments": (
        lambda uid: pb.ForwardRequest(inputs=tensors.encode(torch.ones(1, H))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no segments",
    ),
    "zero-row segment": (
        lambda uid: request(uid, torch.ones(0, H), rows=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "0 rows",
    ),
    "over the row limit": (
        lambda uid: request(uid, torch.ones(MAX_ROWS + 1, H)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        str(MAX_ROWS),
    ),
    "plaintext to a sealed-only peer": (
        lambda uid: request(uid, torch.ones(2, H)),
        grpc.StatusCode.UNAUTHENTICATED,
        "only takes sealed requests",
    ),
    "over the message size limit": (
        lambda uid: request(uid, torch.ones(MAX_MESSAGE_BYTES // (4 * H) + 16, H)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_precise_status(stub, uid, case):
    make, code, words = CASES[case]
    got_code, details = status_of(stub, make(uid))
    assert got_code == code, details
    assert words in details
    assert_still_serves(stub, uid)


def test_missed_deadline(stub, uid):
    # 4096 rows take several ms of compute; a 1 ms deadline cannot be met
    got_code, _ = status_of(stub, SealedStub(stub).build(uid, torch.randn(MAX_ROWS, H)).request, timeout=0.001)
    assert got_code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_still_serves(stub, uid)


def test_info_describes_hosted_experts(stub, tiny_checkpoint):
    info = stub.Info(pb.InfoRequest(), timeout=5)
    manifest = toy_model.read_manifest(tiny_checkpoint)
    assert info.protocol == "moe_swarm.v1" and info.model_id == manifest.model_id
    assert {e.uid for e in info.experts} == {expert_uid(manifest.model_id, lay, e) for lay in (0, 1) for e in range(4)}
    assert all(e.hidden_dim == H and e.dtype == "float32" and e.kind == "swiglu" for e in info.experts)
    assert info.max_rows == MAX_ROWS and info.max_message_bytes == MAX_MESSAGE_BYTES and info.state == "online"
