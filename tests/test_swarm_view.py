"""Which DHT records the coordinator's swarm view treats as live between refreshes."""

from __future__ import annotations

import pytest
from hivemind.utils import get_dht_time

from coordinator.dispatch.swarm import Replica, SwarmView
from protos.records import PeerRecord, PeerState

pytestmark = pytest.mark.unit  # pure logic: the fast subset


def record(state: PeerState = PeerState.ONLINE) -> PeerRecord:
    return PeerRecord(endpoint="127.0.0.1:1", state=state, load=0, throughput=1.0, device="cpu", version="t")


def view_with(expirations: dict[str, float], refreshed_ago: float, period: float = 5.0) -> SwarmView:
    view = SwarmView(dht=None, uids=["m/0/0"], refresh_period=period)
    now = get_dht_time()
    view._replicas = {"m/0/0": [Replica(p, record(), now + dt) for p, dt in expirations.items()]}
    view._refreshed_at = now - refreshed_ago
    return view


def live(view: SwarmView) -> set[str]:
    return {r.peer_id for r in view.replicas("m/0/0")}


def test_record_expiring_after_the_last_refresh_stays_live_until_the_next():
    # A re-announced its record 1 s after our refresh; our copy "expired" 1 s ago
    view = view_with({"A": -1.0, "B": +3.0, "C": -4.0}, refreshed_ago=3.0)
    assert live(view) == {"A", "B"}  # C had expired already when we last looked


def test_without_refreshes_records_expire_after_two_periods():
    view = view_with({"A": -1.0, "B": -20.0, "C": +1.0}, refreshed_ago=60.0, period=5.0)
    assert live(view) == {"A", "C"}  # cutoff: now - 10 s


def test_only_serving_states_are_live():
    view = view_with({"A": +5.0}, refreshed_ago=0.0)
    view._replicas["m/0/0"].append(Replica("D", record(PeerState.DRAINING), get_dht_time() + 5))
    view._replicas["m/0/0"].append(Replica("L", record(PeerState.LEFT), get_dht_time() + 5))
    assert live(view) == {"A"}
