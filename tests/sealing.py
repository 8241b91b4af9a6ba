"""A blocking sealed client for tests that talk to a peer's gRPC service directly."""

from __future__ import annotations

import itertools

import torch

from coordinator.dispatch import sealed
from protos import expert_service_pb2 as pb
from protos.envelope import Identity


class SealedStub:
    def __init__(self, stub, identity: Identity | None = None) -> None:
        self.stub = stub
        info = stub.Info(pb.InfoRequest(), timeout=10)
        self.peer_identity, self.peer_kx = info.identity, info.kx_public
        self.identity = identity or Identity.generate()
        hello, self.keys = sealed.hello(self.identity, self.peer_kx)
        assert stub.OpenSession(hello, timeout=10).session_id == self.keys.session_id
        self.counters = itertools.count(1)

    def build(self, uid: str, x: torch.Tensor, timeout: float = 10.0) -> sealed.Sent:
        return sealed.build_request([(uid, x.shape[0])], x, timeout, self.keys, next(self.counters))

    def forward(self, uid: str, x: torch.Tensor, timeout: float = 10.0) -> torch.Tensor:
        sent = self.build(uid, x, timeout)
        return sealed.open_response(sent, self.stub.Forward(sent.request, timeout=timeout), self.peer_identity)[0]
