"""`moe-swarm simulate`: a churning swarm of real processes; no request fails, nothing is silent.

The two end-to-end runs drive `python -m coordinator simulate` as a user would and read its
JSON report; the schedule and impairment checks are pure logic and run in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest

from coordinator.sim.schedule import FaultEvent, load_schedule, make_schedule, plan_peers, save_schedule
from peer.backends.faults import Impairment
from peer.service.errors import RequestError

SIM = [sys.executable, "-m", "coordinator", "simulate", "--no-live"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim-cache")  # the tiny checkpoint is built once for the module


def started_pids(workdir: Path, report: dict | None) -> set[int]:
    """Every process the simulator started: ready files (last incarnations) and every event with a pid."""
    pids = {json.loads(f.read_text())["pid"] for f in workdir.glob("*.ready.json")}
    if report:
        pids |= {e["pid"] for e in report["events"] if e.get("pid")}
    return pids


def leftovers(pids: set[int]) -> list[str]:
    """Processes still alive among `pids` or in their sessions (each peer leads one: its p2pd and DHT helper)."""
    left = []
    for proc in psutil.process_iter(["pid", "name", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.pid in pids or os.getsid(proc.pid) in pids:
                left.append(f"{proc.pid} {proc.info['name']}")
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return left


def simulate(tmp_path: Path, cache: Path, *args: str, timeout: float = 150) -> tuple[dict, str]:
    report_path = tmp_path / "report.json"
    run = subprocess.run(
        [*SIM, "--cache", str(cache), "--workdir", str(tmp_path / "swarm"), "--json", str(report_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert report_path.is_file(), f"no report (exit {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    assert run.returncode == (0 if report["requests"]["failed"] == 0 else 1), run.stderr[-3000:]
    assert not leftovers(started_pids(tmp_path / "swarm", report))  # everything it started is gone
    noise = ("Traceback", "Task was destroyed", "aclose()", "Event loop is closed")
    assert not any(n in run.stderr for n in noise), run.stderr[-3000:]
    return report, run.stdout


def test_churn_with_replication_two_completes_every_request(tmp_path, cache):
    from PIL import Image

    png = tmp_path / "timeline.png"
    report, stdout = simulate(
        tmp_path,
        cache,
        *("--peers", "8", "--replication", "2", "--duration", "22", "--seed", "3", "--rate", "2"),
        *("--fault-interval", "3", "--faults", "kill=2,stop=1,stall=1", "--downtime", "2", "--stall", "2"),
        *("--plot", str(png)),
    )
    req, tok, dis = report["requests"], report["tokens"], report["dispatch"]
    assert req["total"] >= 10 and req["failed"] == 0 and req["success_rate"] == 1.0
    assert tok["routed"] > 0 and tok["dropped"] == 0
    assert tok["exact"] + tok["rerouted"] + tok["dropped"] == tok["routed"] and tok["consistent"]
    # with a live replica for every expert at all times nothing is even rerouted: the answers are the local model's
    assert tok["rerouted"] == 0 and req["match_local"] == req["total"]
    faults = [e for e in report["events"] if e["action"] in ("kill", "stop", "stall", "restart")]
    assert len(faults) >= 6 and report["faults"]["kill"] + report["faults"]["stop"] >= 3, report["events"]
    assert report["faults"]["restart"] >= 2
    assert dis["retries"] + dis["hedges"] > 0  # the faults were met, and handled
    assert sum(p["rpcs"] for p in report["peers"]) == dis["rpcs"]  # every RPC is attributed to a peer
    assert any(p["restarts"] for p in report["peers"]) and all(0 < p["uptime_frac"] <= 1 for p in report["peers"])
    assert "per peer" in stdout and "100.0% complete" in stdout
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 400 and img.height >= 300
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 100  # something is drawn on it


def test_without_replication_lost_experts_are_counted(tmp_path, cache):
    schedule = tmp_path / "faults.json"
    # peer0 (experts 0-1 of every layer) dies for good; peer2 leaves gracefully and comes back
    save_schedule(schedule, [FaultEvent(2, "kill", "peer0"), FaultEvent(4, "stop", "peer2", duration=3)])
    report, _ = simulate(
        tmp_path,
        cache,
        *("--peers", "4", "--replication", "1", "--duration", "10", "--schedule", str(schedule)),
        "--fallback",
        "reroute",
    )
    req, tok = report["requests"], report["tokens"]
    assert [e["action"] for e in report["events"] if e["action"] in ("kill", "stop")] == ["kill", "stop"]
    assert tok["rerouted"] + tok["dropped"] > 0  # counted, never silent
    assert tok["exact"] + tok["rerouted"] + tok["dropped"] == tok["routed"]
    assert req["failed"] == 0 and req["match_local"] < req["total"]  # rerouted answers differ, and it shows


def test_ctrl_c_prints_the_report_so_far_and_stops_everything(tmp_path, cache):
    workdir = tmp_path / "swarm"
    proc = subprocess.Popen(
        [*SIM, "--cache", str(cache), "--workdir", str(workdir), "--peers", "1", "--replication", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        for line in proc.stderr:  # the load starts right after this line
            seen.append(line)
            if "coordinator(s) ready" in line:
                break
        else:
            raise AssertionError("".join(seen))
        time.sleep(1.0)
        pids = started_pids(workdir, None)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: the report so far" in out and "per peer" in out
    assert "Traceback" not in err and "Task was destroyed" not in err, err
    assert len(pids) == 2 and not leftovers(pids)  # the bootstrap node and the peer


@pytest.mark.unit
def test_dry_run_prints_the_plan_as_tables(capsys):
    from coordinator.cli import build_parser
    from coordinator.sim.simulate import run_simulate

    args = build_parser().parse_args(["simulate", "--dry-run", "--peers", "4", "--seed", "2"])
    assert run_simulate(args) == 0
    out = capsys.readouterr().out
    assert "4 peers" in out and "scheduled faults" in out and "replica group" in out
    assert "{" not in out  # not raw JSON


# ---- pure logic: the plan and the impairment --------------------------------------------


@pytest.mark.unit
def test_schedule_is_deterministic_and_keeps_a_replica_up():
    plans = plan_peers(8, 8, 2, seed=5, slow_fraction=0.25, slowdown=3, latency_ms=20)
    assert [p.experts for p in plans[:4]] == [p.experts for p in plans[4:]] == ["*:0-1", "*:2-3", "*:4-5", "*:6-7"]
    assert sum("sim-slowdown" in p.impairment for p in plans) == 2
    assert plan_peers(8, 8, 2, seed=5, slow_fraction=0.25, slowdown=3, latency_ms=20) == plans
    kw = dict(interval=2.0, downtime=2.0, restart_allowance=5.0)
    events = make_schedule(plans, 5, 120, **kw)
    assert events == make_schedule(plans, 5, 120, **kw) != make_schedule(plans, 6, 120, **kw)
    assert {e.action for e in events} == {"kill", "stop", "stall"}
    group = {p.name: p.group for p in plans}
    for e in events:  # nominally, no other member of its group is down while it is
        end = e.at + e.duration + (kw["restart_allowance"] if e.action != "stall" else 0)
        for o in events:
            o_end = o.at + o.duration + (kw["restart_allowance"] if o.action != "stall" else 0)
            if o is not e and group[o.peer] == group[e.peer]:
                assert o_end <= e.at or o.at >= end, (e, o)


@pytest.mark.unit
def test_schedule_file_round_trip_and_validation(tmp_path):
    path = tmp_path / "s.json"
    events = [FaultEvent(1.5, "kill", "peer1", duration=2), FaultEvent(3, "join", "new", experts="*:0-3")]
    save_schedule(path, events)
    assert load_schedule(path, ["peer0", "peer1"]) == events
    path.write_text(json.dumps([{"at": 1, "action": "kill", "peer": "peer9"}]))
    with pytest.raises(ValueError, match="unknown peer 'peer9'"):
        load_schedule(path, ["peer0"])
    with pytest.raises(ValueError, match="unknown fault action"):
        FaultEvent(1, "explode", "peer0")


@pytest.mark.unit
def test_impairment_delays_and_loses_deterministically():
    imp = Impairment(slowdown=3, latency_ms=10, jitter_ms=4, seed=1)
    delays = [imp.delay_ms(5.0) for _ in range(200)]
    assert all(10 + 6 <= d <= 10 + 14 for d in delays)  # 2 x 5 ms compute + 10 +- 4 ms
    again = Impairment(slowdown=3, latency_ms=10, jitter_ms=4, seed=1)
    assert delays == [again.delay_ms(5.0) for _ in range(200)]
    lossy = Impairment(loss=0.3, seed=2)
    lost = [lossy.lost() for _ in range(1000)]
    assert 200 < sum(lost) < 400
    assert not Impairment().active and Impairment(loss=0.1).active
    with pytest.raises(ValueError):
        Impairment(slowdown=0.5)

    async def apply() -> float:
        start = time.perf_counter()
        with pytest.raises(RequestError) as err:
            await Impairment(latency_ms=30, loss=0.999, seed=0).apply(1.0)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        return time.perf_counter() - start

    assert asyncio.run(apply()) >= 0.03  # a lost answer still took its time
