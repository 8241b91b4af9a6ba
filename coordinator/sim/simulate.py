"""`moe-swarm simulate`: a churning swarm of real processes on 127.0.0.1, under load, measured.

Starts a bootstrap DHT node and N `moe-peer` processes hosting a tiny model's experts
(replication R, or `--experts auto`), drives generation (or layer calls) through one or
more coordinators, and meanwhile runs a fault schedule (from `--seed` or a file): peers
SIGKILLed, gracefully stopped, SIGSTOPped, restarted, new peers joining; some peers slowed,
with added latency, jitter and loss (peer/impair.py). At the end: a report of requests,
tokens exact/rerouted/dropped, latency percentiles, retries/hedges/bans, what verification
found (spot checks, cheaters and their evidence, bad receipts) and per-peer load and
uptime; `--json` and `--plot` write it for machines and people. Every process started is
stopped on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live

from coordinator.client import SwarmClient
from coordinator.dispatch.fallback import FALLBACK_POLICIES
from coordinator.dispatch.stats import DispatchStats
from coordinator.ops.console import console as make_console
from coordinator.sim.local_swarm import LaunchError, LocalSwarm
from coordinator.sim.peers import Simulation, build_plan
from coordinator.sim.report import build_report, live_view, plot_report, print_plan, print_report
from coordinator.sim.schedule import FaultEvent
from coordinator.sim.workload import LoadThread, RequestRecord, generation_workload, layer_workload

TICK_S = 0.1
SAMPLE_S = 0.5  # peer-count timeline resolution


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peers", type=int, default=8, help="peer processes at the start")
    p.add_argument("--replication", type=int, default=2, help="peers hosting each expert (peers / R slices)")
    p.add_argument("--experts", choices=["slices", "auto"], default="slices", help="auto: peers pick (--experts auto)")
    p.add_argument("--load", choices=["generate", "layer"], default="generate", help="what the coordinators send")
    p.add_argument("--family", default="mixtral", help="tiny model family for --load generate")
    p.add_argument("--coordinators", type=int, default=1, help="coordinator clients, each with its own load thread")
    p.add_argument("--rate", type=float, default=0.0, help="requests/s per coordinator (0: back to back)")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per request")
    p.add_argument("--tokens", type=int, default=16, help="--load layer: tokens per layer call")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (faults happen within it)")
    p.add_argument("--seed", type=int, default=0, help="fixes the fault schedule, impairments and prompts")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the tiny model's weights")
    p.add_argument("--schedule", type=Path, default=None, help="JSON fault schedule instead of one drawn from --seed")
    p.add_argument("--fault-interval", type=float, default=4.0, help="seconds between faults (+-25%%)")
    p.add_argument("--faults", default="kill=2,stop=1,stall=1", help="relative weights of kill, stop, stall, join")
    p.add_argument("--downtime", type=float, default=3.0, help="seconds a killed or stopped peer stays down")
    p.add_argument("--stall", type=float, default=2.0, help="seconds a stalled peer stays SIGSTOPped")
    p.add_argument("--slow-fraction", type=float, default=0.0, help="fraction of peers with slowed compute")
    p.add_argument("--slowdown", type=float, default=3.0, help="compute slowdown factor of the slowed peers")
    p.add_argument("--latency-ms", type=float, default=0.0, help="mean added latency per peer (each 0.5-1.5x)")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="+- uniform jitter on every answer")
    p.add_argument("--loss", type=float, default=0.0, help="probability a request to a peer fails")
    p.add_argument("--cheaters", type=int, default=0, help="peers that corrupt their outputs and sign them as honest")
    p.add_argument(
        "--spot-check", type=float, default=0.0, help="base fraction of answers the coordinators verify (0-1)"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds one layer call may take")
    p.add_argument("--fallback", default="reroute", choices=FALLBACK_POLICIES, help="when no replica answers")
    p.add_argument("--no-hedge", action="store_true", help="never send hedged duplicates")
    p.add_argument("--announce-period", type=float, default=2.0, help="peers' DHT refresh period")
    p.add_argument("--max-defer", type=float, default=30.0, help="give up a fault that would kill the last replica")
    p.add_argument("--workdir", type=Path, default=None, help="keep the peers' logs and ready files here")
    p.add_argument("--cache", type=Path, default=Path(".cache"), help="where the seeded tiny checkpoints are kept")
    p.add_argument("--json", type=Path, default=None, help="write the full report as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG timeline (needs matplotlib: .[sim])")
    p.add_argument("--dry-run", action="store_true", help="print the peers and the fault schedule, start nothing")
    p.add_argument("--no-live", action="store_true", help="no live progress view")


_MAIN_PID = os.getpid()
# Set by Ctrl-C / SIGTERM. The KeyboardInterrupt a signal raises is lost when it lands in a
# __del__ or a weakref callback (Python only prints it), so the run loop checks this too.
_INTERRUPTED = threading.Event()


def _interrupt(signum: int, frame: object) -> None:
    if os.getpid() != _MAIN_PID:  # a forked helper (hivemind's DHT process) inherited this handler: just die
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def run_simulation(args: argparse.Namespace, console: Console | None = None) -> dict:
    console = console or make_console(stderr=True)
    # SIGTERM unwinds like Ctrl-C, so every `with` below stops what it started
    _INTERRUPTED.clear()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with LocalSwarm(args.workdir) as swarm:
            try:
                return _run(args, swarm, console)
            finally:
                stopping, count = time.monotonic(), len(swarm.processes)
                # SIGTERM (peers drain and withdraw), SIGKILL to the group of any still there after 5 s
                swarm.stop_many(list(reversed(swarm.processes)), signal.SIGTERM, timeout=5)
                console.print(f"stopped the {count} processes still running in {time.monotonic() - stopping:.1f}s")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace, swarm: LocalSwarm, console: Console) -> dict:
    started = time.monotonic()
    make = generation_workload if args.load == "generate" else layer_workload
    workload = make(args)
    plans, schedule = build_plan(args, workload.num_experts)
    swarm.start_bootstrap()
    sim = Simulation(args, swarm, workload, plans)
    console.print(f"starting a bootstrap node and {len(plans)} peers (logs in {swarm.workdir})")
    for peer in sim.peers.values():
        sim.launch(peer)
    while any(p.state == "starting" for p in sim.peers.values()):
        sim.poll()
        time.sleep(TICK_S)
    if any(p.state != "up" for p in sim.peers.values()):
        raise LaunchError(f"peers failed to start: {[e for e in sim.events if e['action'] == 'start-failed']}")
    clients: list[SwarmClient] = []
    threads: list[LoadThread] = []
    try:
        for i in range(args.coordinators):
            client = SwarmClient(
                swarm.initial_peers,
                workload.uids,
                refresh_period=1.0,
                timeout=args.timeout,
                fallback=args.fallback,
                hedge=not args.no_hedge,
                spot_check=args.spot_check,
            )
            clients.append(client)
            client.wait_for_experts(timeout=60)
            threads.append(LoadThread(i, client, workload.make_runner(client), workload.check, 0.0, args.rate))
        console.print(f"swarm up and {len(clients)} coordinator(s) ready in {time.monotonic() - started:.1f}s")
        sim.usable = lambda uid, peer_id: all(_usable(c, uid, peer_id) for c in clients)
        sim.setup_s = time.monotonic() - started
        return _drive(args, sim, schedule, clients, threads, console)
    finally:
        for t in threads:
            t.stop.set()
        for t in threads:
            t.join(args.timeout * 3)
        sim.close()
        for client in clients:
            client.close()


def _drive(
    args: argparse.Namespace,
    sim: Simulation,
    schedule: list[FaultEvent],
    clients: list[SwarmClient],
    threads: list[LoadThread],
    console: Console,
) -> dict:
    for peer in sim.peers.values():  # uptime counts from the load's start
        peer.uptime_s, peer.since = 0.0, time.monotonic()
    sim.events.clear()
    sim.t0 = time.monotonic()
    for t in threads:
        t.t0 = sim.t0
        t.start()
    pending = list(schedule)
    deferred_since: dict[int, float] = {}
    last_sample = -SAMPLE_S
    interrupted = False
    with Live(console=console, refresh_per_second=4, transient=True, auto_refresh=not args.no_live) as live:
        try:
            while sim.now() < args.duration:
                if _INTERRUPTED.is_set():
                    raise KeyboardInterrupt  # a Ctrl-C whose exception was swallowed on its way
                sim.poll()
                _apply_due(args, sim, pending, deferred_since)
                if sim.now() - last_sample >= SAMPLE_S:
                    last_sample = sim.now()
                    sim.peer_timeline.append((round(last_sample, 2), sim.counts()["up"]))
                if not args.no_live:
                    live.update(live_view(sim, _records(threads), _stats(clients), args.duration))
                time.sleep(TICK_S)
        except KeyboardInterrupt:  # the report of what ran so far is still worth having
            interrupted = True
        for t in threads:
            t.stop.set()
        for t in threads:  # the requests in flight finish: they count (not waited for long after a Ctrl-C)
            t.join(1.0 if interrupted else args.timeout * 3)
    seconds = sim.now()
    sim.close()
    sim.peer_timeline.append((round(seconds, 2), sim.counts()["up"]))
    report = build_report(args, sim, _records(threads), _stats(clients), seconds)
    report["schedule"] = [e.to_dict() for e in schedule]
    report["interrupted"] = interrupted
    _write_report(args, report)
    if interrupted:
        raise KeyboardInterrupt
    return report


def _apply_due(
    args: argparse.Namespace, sim: Simulation, pending: list[FaultEvent], deferred_since: dict[int, float]
) -> None:
    """Run the fault events that are due; one that would take an expert's last replica waits (up to --max-defer)."""
    for event in [e for e in pending if e.at <= sim.now()]:
        if sim.apply(event):
            if id(event) in deferred_since:
                sim.events[-1]["note"] += f" (deferred {sim.now() - deferred_since.pop(id(event)):.1f}s)"
            pending.remove(event)
        elif sim.now() - deferred_since.setdefault(id(event), sim.now()) > args.max_defer:
            sim.log("skipped", event.peer, f"{event.action}: would take the last replica", event.at)
            pending.remove(event)


def _usable(client: SwarmClient, uid: str, peer_id: str) -> bool:
    """`client` would send `peer_id` work for `uid` now (read from the simulator's thread: the
    view is swapped whole, and a ban is one dict read)."""
    return any(r.peer_id == peer_id for r in client.dispatcher.planner.candidates(uid))


def _records(threads: list[LoadThread]) -> list[RequestRecord]:
    return sorted((r for t in threads for r in list(t.records)), key=lambda r: r.t)


def _stats(clients: list[SwarmClient]) -> DispatchStats:
    return DispatchStats.merge(c.dispatcher.stats for c in clients)


def _write_report(args: argparse.Namespace, report: dict) -> None:
    print_report(make_console(), report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot_report(report, args.plot)


def run_simulate(args: argparse.Namespace) -> int:
    if args.dry_run:
        num_experts = 8  # both tiny workloads have 8 experts per layer
        plans, schedule = build_plan(args, num_experts)
        if args.json:
            plan = {"peers": [vars(p) for p in plans], "schedule": [e.to_dict() for e in schedule]}
            args.json.write_text(json.dumps(plan, indent=1))
        print_plan(make_console(), plans, schedule)
        return 0
    try:
        report = run_simulation(args)
    except KeyboardInterrupt:
        print("moe-swarm simulate: interrupted; every process it started is stopped", flush=True)
        return 130
    ok = report["requests"]["failed"] == 0 and report["tokens"]["consistent"]
    return 0 if ok else 1
