"""DispatchStats: recording, merging several coordinators' stats without losing a field, and the
simulation report that shows them. Pure logic: no processes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections import Counter, deque
from types import SimpleNamespace

import pytest
from rich.console import Console

from coordinator.dispatch.stats import SAMPLES_KEPT, DispatchStats
from coordinator.ops.report import counts_line
from coordinator.sim.peers import Simulation
from coordinator.sim.report import build_report, live_view, print_report
from coordinator.sim.schedule import PeerPlan
from coordinator.sim.workload import RequestRecord

pytestmark = pytest.mark.unit  # pure logic: the fast subset


def sample_value(name: str, hint: object, n: int) -> object:
    """A non-default value for a field of this type, distinct per field and per `n`."""
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if hint is int:
        return 10 * n + len(name)
    if origin is list:
        return [{"from": name, "n": n}] if args == (dict,) else [float(n), n + 0.5]
    if origin is deque:
        return deque([float(n), n + 0.5], maxlen=SAMPLES_KEPT)
    if origin is Counter:
        return Counter({f"peer-{n}": n + 1, "shared": 2})
    if origin is dict and typing.get_origin(args[1]) is deque:
        return {n: deque([float(n)], maxlen=SAMPLES_KEPT), 99: deque([0.25], maxlen=SAMPLES_KEPT)}
    if origin is dict and args == (str, str):
        return {f"peer-{n}": f"127.0.0.1:{n}", "shared": f"host-{n}:1"}
    raise AssertionError(f"no sample value for field {name}: {hint}: teach this test (and DispatchStats.merge)")


def full_stats(n: int) -> DispatchStats:
    """Every field set to a non-default value, generated from the fields so none is forgotten."""
    hints = typing.get_type_hints(DispatchStats)
    stats = DispatchStats(**{f.name: sample_value(f.name, hints[f.name], n) for f in dataclasses.fields(DispatchStats)})
    for f in dataclasses.fields(DispatchStats):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert getattr(stats, f.name) != default, f.name
    return stats


def test_merge_keeps_every_field():
    a, b = full_stats(1), full_stats(2)
    before = dataclasses.asdict(a), dataclasses.asdict(b)
    total = DispatchStats.merge([a, b])
    hints = typing.get_type_hints(DispatchStats)
    for f in dataclasses.fields(DispatchStats):
        got, x, y = getattr(total, f.name), getattr(a, f.name), getattr(b, f.name)
        origin = typing.get_origin(hints[f.name]) or hints[f.name]
        if origin in (int, list, deque, Counter):  # sums, concatenations, counts added
            assert got == x + y, f.name
        elif typing.get_args(hints[f.name]) == (str, str):
            assert got == {**x, **y}, f.name  # the later stats win for a key both have
        else:
            assert {k: list(v) for k, v in got.items()} == {k: [*x.get(k, ()), *y.get(k, ())] for k in {*x, *y}}
    assert (dataclasses.asdict(a), dataclasses.asdict(b)) == before  # the inputs are unchanged
    total.rpc_ms.append(1.0)
    total.layer_ms[99].append(1.0)
    assert (dataclasses.asdict(a), dataclasses.asdict(b)) == before  # and share nothing with the total


def test_merge_of_one_equals_it_and_of_none_is_empty():
    a = full_stats(3)
    assert DispatchStats.merge([a]) == a
    assert DispatchStats.merge([]) == DispatchStats()


def test_merge_refuses_a_field_type_it_has_no_rule_for():
    @dataclasses.dataclass
    class WithFloat(DispatchStats):
        mean_ms: float = 0.0

    with pytest.raises(TypeError, match="mean_ms"):
        WithFloat.merge([WithFloat()])


def test_recording_counts_every_routed_slot():
    s = DispatchStats()
    s.record_rpc("p1", "127.0.0.1:1", rows=6, ms=2.0)
    s.record_rpc("p1", "127.0.0.1:1", rows=2, ms=3.0)
    s.record_failure(refused=True, retried=2)
    s.record_failure(refused=False, retried=1)
    s.record_bad_receipt()
    s.record_layer(layer=3, routed=10, rerouted=2, dropped=1, ms=7.0)
    assert (s.rpcs, list(s.rpc_ms), s.rows_by_peer["p1"], s.endpoints) == (2, [2.0, 3.0], 8, {"p1": "127.0.0.1:1"})
    assert (s.refusals, s.bans, s.retries, s.bad_receipts) == (1, 2, 3, 1)
    assert (s.layer_calls, s.routed, s.exact, s.rerouted, s.dropped) == (1, 10, 7, 2, 1)
    assert {k: list(v) for k, v in s.layer_ms.items()} == {3: [7.0]} and s.calls_by_layer == {3: 1}


def test_latency_samples_are_a_bounded_window_and_merging_keeps_every_window():
    a, b = DispatchStats(), DispatchStats()
    for i in range(SAMPLES_KEPT + 10):
        a.record_layer(layer=0, routed=2, rerouted=0, dropped=0, ms=float(i))
        a.record_rpc("p", "127.0.0.1:1", rows=2, ms=float(i))
        a.record_peer_compute(float(i))
    b.record_layer(layer=0, routed=2, rerouted=0, dropped=0, ms=-1.0)
    for series in (a.layer_ms[0], a.rpc_ms, a.peer_compute_ms):
        assert list(series) == [float(i) for i in range(10, SAMPLES_KEPT + 10)]  # the most recent ones
    assert a.layer_calls == a.calls_by_layer[0] == a.rpcs == SAMPLES_KEPT + 10  # the counts stay whole
    total = DispatchStats.merge([a, b])
    assert len(total.layer_ms[0]) == SAMPLES_KEPT + 1 and total.calls_by_layer[0] == SAMPLES_KEPT + 11
    a.clear_samples()  # a benchmark's warm-up is over
    assert not a.rpc_ms and not a.peer_compute_ms and not a.layer_ms[0] and a.rpcs == SAMPLES_KEPT + 10


def test_simulation_report_shows_verification_counts():
    args = argparse.Namespace(load="layer", duration=5.0, peers=1, replication=1, seed=0)
    sim = Simulation(args, None, SimpleNamespace(tokens_per_request=4), [PeerPlan("peer0", "*:0-7", 0)])
    sim.peers["peer0"].peer_ids.append("p1")
    records = [RequestRecord(0.1, 12.0, True, True, 0), RequestRecord(0.5, 30.0, False, False, 0, "boom")]
    stats = DispatchStats()
    stats.record_rpc("p1", "127.0.0.1:1", rows=8, ms=2.0)
    stats.record_layer(layer=0, routed=8, rerouted=0, dropped=0, ms=3.0)
    stats.record_spot_checks(5)
    stats.record_spot_unresolved()
    stats.record_cheater({"expert": "m/0/1"})
    stats.record_cheater({"expert": "m/0/2"})
    stats.record_bad_receipt()
    stats.cheaters_banned += 1  # distinct from the evidence count, to tell them apart
    report = build_report(args, sim, records, DispatchStats.merge([stats]), seconds=5.0)
    want = {"spot_checks": 5, "spot_unresolved": 1, "cheaters_banned": 3, "evidence": 2, "bad_receipts": 1}
    assert {k: report["dispatch"][k] for k in want} == want
    assert report["requests"]["failed"] == 1 and report["tokens"]["consistent"]
    assert json.loads(json.dumps(report))["dispatch"]["evidence"] == 2
    console = Console(record=True, width=200)
    print_report(console, report)
    console.print(live_view(sim, records, stats, args.duration))
    text = console.export_text()
    line = "5 spot checks (1 unresolved), 3 cheaters banned (2 evidence), 1 bad receipts"
    assert text.count(line) == 2  # the table and the live view


def test_the_summary_line_counts_cheaters_as_bans_and_shows_disputes():
    stats = DispatchStats()
    stats.record_failure(refused=False, retried=1)
    stats.record_cheater({"expert": "m/0/1"})
    stats.record_bad_receipt()
    stats.record_spot_checks(4)
    stats.record_spot_unresolved()
    line = counts_line(stats)
    assert "3 bans (1 proven cheaters, 1 bad receipts)" in line, line
    assert "spot checks: 4 experts recomputed, 1 disputes unresolved" in line, line
