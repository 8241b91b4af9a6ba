"""Pure planning logic of the dispatcher: grouping by expert, then by peer; replica choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.dispatch.dispatcher import Dispatcher
from coordinator.dispatch.health import HealthCache
from coordinator.dispatch.plan import group_by_expert
from coordinator.dispatch.swarm import Replica
from protos.records import PeerRecord, PeerState

pytestmark = pytest.mark.unit  # pure logic: the fast subset


class FixedView:
    """Stands in for the DHT-backed SwarmView: uid -> replicas."""

    def __init__(self, hosts: dict[str, list[str]], load: dict[str, int] | None = None) -> None:
        self.hosts, self.load = hosts, load or {}

    def replicas(self, uid: str) -> list[Replica]:
        return [
            Replica(
                p,
                PeerRecord(
                    endpoint=f"127.0.0.1:{len(p)}",
                    state=PeerState.ONLINE,
                    load=self.load.get(p, 0),
                    throughput=1000.0,
                    device="cpu",
                    version="t",
                ),
                float("inf"),
            )
            for p in self.hosts.get(uid, [])
        ]


UIDS = [f"m/0/{e}" for e in range(4)]


def plan(view, flat, exclude=None, health=None):
    return Dispatcher(view, channels=None, health=health).plan(group_by_expert(np.asarray(flat)), UIDS, exclude)


def test_one_call_per_peer_covering_every_position_once():
    view = FixedView({"m/0/0": ["A"], "m/0/1": ["B"], "m/0/2": ["A"], "m/0/3": ["B"]})
    experts = torch.tensor([[0, 1], [2, 0], [3, 2], [1, 0]])
    flat = experts.T.reshape(-1)  # slot-major, as the dispatcher sends it
    calls, missing = plan(view, flat)
    assert not missing
    by_peer = {c.replica.peer_id: c for c in calls}
    assert sorted(by_peer) == ["A", "B"]
    assert by_peer["A"].segments == [("m/0/0", 3), ("m/0/2", 2)]
    assert by_peer["B"].segments == [("m/0/1", 2), ("m/0/3", 1)]
    positions = np.concatenate([np.concatenate(c.positions) for c in calls])
    assert sorted(positions.tolist()) == list(range(8))
    for call in calls:
        for (uid, rows), pos in zip(call.segments, call.positions, strict=True):
            assert len(pos) == rows and all(UIDS[flat[p]] == uid for p in pos.tolist())
            assert pos.tolist() == sorted(pos.tolist())  # (slot, token) order kept


def test_replicas_already_in_the_call_are_preferred():
    view = FixedView({"m/0/0": ["A"], "m/0/1": ["B", "A"]})
    calls, _ = plan(view, torch.tensor([0, 1]))
    assert [c.replica.peer_id for c in calls] == ["A"]


def test_missing_and_excluded_replicas_are_reported_not_raised():
    view = FixedView({"m/0/0": ["A"], "m/0/1": ["B"]})
    calls, missing = plan(view, torch.tensor([0, 1, 3]), exclude={1: {"B"}})
    assert [c.replica.peer_id for c in calls] == ["A"] and missing == [1, 3]


def test_banned_peers_are_skipped_until_the_ban_expires():
    now = [0.0]
    health = HealthCache(clock=lambda: now[0])
    view = FixedView({"m/0/0": ["A", "B"]})
    assert health.fail("A") == 1.0 and health.fail("A") == 2.0  # exponential backoff
    for _ in range(20):
        assert [c.replica.peer_id for c in plan(view, torch.tensor([0]), health=health)[0]] == ["B"]
    now[0] = 2.5
    assert not health.banned("A")


def test_less_loaded_replica_wins_between_two():
    view = FixedView({"m/0/0": ["A", "B"]}, load={"A": 5000, "B": 0})
    assert all(plan(view, torch.tensor([0]))[0][0].replica.peer_id == "B" for _ in range(20))
