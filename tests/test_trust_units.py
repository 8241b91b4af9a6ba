"""Pure logic of trust: endpoint and text validation, safe printing, the trust store, replica
choice between proven and untried peers, same-operator checks."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
from rich.console import Console

from coordinator.client import swarm_is_local
from coordinator.dispatch.health import HealthCache
from coordinator.dispatch.plan import MAX_UNTRIED_PER_CALL, UNTRIED_ROWS_PER_S, Planner
from coordinator.dispatch.spot import same_operator
from coordinator.dispatch.swarm import Replica
from coordinator.dispatch.trust import MAX_PEERS, TrustStore
from coordinator.ops.status import ExpertStatus, ReplicaStatus, SwarmStatus, print_status
from protos.endpoints import is_local_host, parse_endpoint
from protos.envelope import Identity
from protos.records import PeerRecord, PeerState

pytestmark = pytest.mark.unit  # pure logic: the fast subset


@pytest.mark.parametrize(
    "endpoint",
    [
        "unix:/tmp/peer.sock",
        "unix:///tmp/peer.sock:1",
        "unix:5",
        "unix-abstract:x:1",
        "dns:///127.0.0.1:5000",
        "ipv4:127.0.0.1:5000",
        "http://127.0.0.1:5000",
        "127.0.0.1:5000/path",
        "user@127.0.0.1:5000",
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "1.2.3:4",
        "[not-ipv6]:1",
        "host name:1",
        "",
        "a" * 300 + ":1",
    ],
)
def test_endpoints_other_than_host_port_are_refused(endpoint):
    with pytest.raises(ValueError):
        parse_endpoint(endpoint)
    fields = dict(state=PeerState.ONLINE, load=0, throughput=1.0, device="cpu", version="1")
    raw = PeerRecord.signed(Identity.generate(), b"owner", endpoint=endpoint, **fields).to_dict()
    with pytest.raises(ValueError):
        PeerRecord.from_dict(raw)


def test_host_port_endpoints_and_which_are_local():
    assert parse_endpoint("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_endpoint("[::1]:80") == ("::1", 80)
    assert parse_endpoint("peer-1.example.org:443") == ("peer-1.example.org", 443)
    local = ["127.0.0.1", "10.1.2.3", "192.168.0.7", "172.16.0.1", "169.254.1.1", "::1", "fd00::1", "localhost"]
    public = ["8.8.8.8", "2001:4860:4860::8888", "example.org"]
    assert all(is_local_host(h) for h in local) and not any(is_local_host(h) for h in public)
    assert swarm_is_local(["/ip4/127.0.0.1/tcp/4000/p2p/Qm"]) and swarm_is_local(["/ip4/10.0.0.2/tcp/1"])
    assert not swarm_is_local(["/ip4/127.0.0.1/tcp/1", "/ip4/8.8.8.8/tcp/1"]) and not swarm_is_local([])


@pytest.mark.parametrize("text", ["\x1b[31mred", "line\nbreak", "bell\x07", "\x9b31m", "x" * 65])
def test_record_text_fields_are_printable_and_short(text):
    fields = dict(endpoint="127.0.0.1:1", state=PeerState.ONLINE, load=0, throughput=1.0)
    for name in ("device", "version"):
        values = {"device": "cpu", "version": "1", name: text}
        raw = PeerRecord.signed(Identity.generate(), b"owner", **fields, **values).to_dict()
        with pytest.raises(ValueError, match=f"bad {name}"):
            PeerRecord.from_dict(raw)


def test_status_prints_markup_and_escapes_literally():
    hostile = ReplicaStatus(
        "peer[/]", 5.0, endpoint="127.0.0.1:1", state="online", load=0, throughput=1.0,
        device="[/]", version="\x1b]0;pwned\x07[bold]",
    )  # fmt: skip
    bad = ReplicaStatus("?1", 5.0, error="bad device '[/]\\x1b'")
    status = SwarmStatus("m", "flags", [ExpertStatus("m/0/0", 0, 0, [hostile, bad])])
    console = Console(record=True, width=300, force_terminal=True)
    print_status(console, status)  # a "[/]" parsed as markup raises MarkupError
    text = console.export_text(styles=False)
    assert "[/]" in text and "[bold]" in text and "\\x1b]0;pwned\\x07" in text
    assert "\x1b]0" not in console.export_text(styles=True) and "\x07" not in text


def replica(peer: str, endpoint: str = "127.0.0.1:1", throughput: float = 1e12, kx: bytes = b"") -> Replica:
    rec = PeerRecord(
        endpoint=endpoint, state=PeerState.ONLINE, load=100, throughput=throughput, device="cpu", version="1",
        kx=kx or peer.encode().ljust(32, b"_"),
    )  # fmt: skip
    return Replica(peer, rec, float("inf"))


def planner(replicas: list[Replica], trust: TrustStore | None = None) -> Planner:
    view = SimpleNamespace(replicas=lambda uid: replicas)
    return Planner(view, HealthCache(), random.Random(0), trust or TrustStore())


def test_untried_replicas_get_work_only_without_a_proven_one_and_at_most_a_few_per_call():
    untried = [replica(f"new{i}") for i in range(3 * MAX_UNTRIED_PER_CALL)]
    p = planner([*untried, replica("old")])
    p.health.get("old").observe(5.0, rows=10)
    picks = [p.choose("m/0/0", {}, newcomers=set()).peer_id for _ in range(200)]
    assert 0 < sum(x != "old" for x in picks) < 30  # a small share explores
    p.health.ban("old", 60)
    newcomers: set[str] = set()
    chosen = set()
    for _ in range(100):
        pick = p.choose("m/0/0", {}, exclude=chosen, newcomers=newcomers)
        if pick is None:
            break
        chosen.add(pick.peer_id)
    assert len(chosen) == MAX_UNTRIED_PER_CALL == len(newcomers)


def test_announced_throughput_is_believed_only_as_far_as_observed():
    liar, known = replica("liar", throughput=1e12), replica("known", throughput=1e12)
    p = planner([liar, known])
    p.health.get("known").observe(10.0, rows=50)  # 5000 rows/s seen
    assert p.cost_ms(liar) == pytest.approx(1.0 + 100 * 1000 / UNTRIED_ROWS_PER_S)
    assert p.cost_ms(known) == pytest.approx(10.0 + 100 * 1000 / 5000)


def test_verifiers_prefer_history_and_never_share_an_operator():
    a, b, c = replica("a", "10.0.0.1:1"), replica("b", "10.0.0.1:2"), replica("c", "10.0.0.2:1")
    assert not same_operator(a, b, local=True) and same_operator(a, b, local=False)
    assert same_operator(a, replica("d", "10.0.0.9:9", kx=a.record.kx), local=True)
    assert same_operator(a, replica("e", "10.0.0.1:1"), local=True)
    trust = TrustStore()
    for _ in range(3):
        trust.agreed("c")
    p = planner([a, b, c], trust)
    assert {p.choose("m/0/0", {}, exclude={"a"}, verifier=True).peer_id for _ in range(20)} == {"c"}


def test_trust_store_keeps_bans_and_history_across_runs_within_bounds(tmp_path):
    path, now = tmp_path / "state" / "trust.json", [1000.0]
    store = TrustStore(path, clock=lambda: now[0])
    store.agreed("honest")
    store.convict("cheater", 3600, {"expert": "m/0/0", "wrong": {"peer_id": "cheater"}})
    assert json.loads(next((path.parent / "evidence").glob("*.json")).read_text())["expert"] == "m/0/0"
    again = TrustStore(path, clock=lambda: now[0] + 60)
    assert again.bans() == {"cheater": pytest.approx(3540)} and again.history("honest") == 1
    for i in range(MAX_PEERS + 10):
        again.agreed(f"sybil{i}")
    again.save()
    assert len(json.loads(path.read_text())["peers"]) == MAX_PEERS and "cheater" in again.peers
    path.write_text("{not json")
    assert TrustStore(path).peers == {}  # unreadable: a warning, a clean start


def test_simulation_plans_cheaters_without_changing_the_other_draws():
    from coordinator.sim.schedule import CHEAT_SCALE, plan_peers

    base = plan_peers(8, 8, 2, seed=5, slow_fraction=0.25, slowdown=3, latency_ms=20)
    with_cheaters = plan_peers(8, 8, 2, seed=5, slow_fraction=0.25, slowdown=3, latency_ms=20, cheaters=2)
    assert sum(p.impairment.get("sim-corrupt") == CHEAT_SCALE for p in with_cheaters) == 2
    for a, b in zip(base, with_cheaters, strict=True):
        assert {k: v for k, v in b.impairment.items() if k != "sim-corrupt"} == a.impairment
    with pytest.raises(ValueError):
        plan_peers(2, 8, 1, seed=0, cheaters=3)
