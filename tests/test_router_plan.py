"""Pure planning logic of the dispatcher: grouping by expert, then by peer."""

from __future__ import annotations

import pytest
import torch

from coordinator.router import Dispatcher, ExpertUnavailableError
from coordinator.swarm import Replica
from protos.records import PeerRecord, PeerState


class FixedView:
    """Stands in for the DHT-backed SwarmView: uid -> replicas."""

    def __init__(self, hosts: dict[str, list[str]]) -> None:
        self.hosts = hosts

    def replicas(self, uid: str) -> list[Replica]:
        rec = PeerRecord(
            endpoint=f"127.0.0.1:{len(uid)}", state=PeerState.ONLINE, load=0, throughput=0, device="cpu", version="t"
        )
        return [Replica(p, rec, float("inf")) for p in self.hosts.get(uid, [])]


UIDS = [f"m/0/{e}" for e in range(4)]


def test_one_call_per_peer_covering_every_position_once():
    view = FixedView({"m/0/0": ["A"], "m/0/1": ["B"], "m/0/2": ["A"], "m/0/3": ["B"]})
    experts = torch.tensor([[0, 1], [2, 0], [3, 2], [1, 0]])
    calls = Dispatcher(view, channels=None).plan(experts.reshape(-1), UIDS)
    assert sorted(c.replica.peer_id for c in calls) == ["A", "B"]
    by_peer = {c.replica.peer_id: c for c in calls}
    assert by_peer["A"].segments == [("m/0/0", 3), ("m/0/2", 2)]
    assert by_peer["B"].segments == [("m/0/1", 2), ("m/0/3", 1)]
    positions = torch.cat([torch.cat(c.positions) for c in calls])
    assert sorted(positions.tolist()) == list(range(8))
    flat = experts.reshape(-1)
    for call in calls:
        for (uid, rows), pos in zip(call.segments, call.positions, strict=True):
            assert len(pos) == rows and all(UIDS[flat[p]] == uid for p in pos.tolist())


def test_replicas_already_in_the_call_are_preferred():
    view = FixedView({"m/0/0": ["A"], "m/0/1": ["B", "A"]})
    calls = Dispatcher(view, channels=None).plan(torch.tensor([0, 1]), UIDS)
    assert [c.replica.peer_id for c in calls] == ["A"]


def test_missing_expert_is_named():
    view = FixedView({"m/0/0": ["A"]})
    with pytest.raises(ExpertUnavailableError, match="m/0/3"):
        Dispatcher(view, channels=None).plan(torch.tensor([0, 3]), UIDS)
