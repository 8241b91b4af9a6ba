"""`moe-swarm simulate`: a churning swarm of real processes on 127.0.0.1, under load, measured.

Starts a bootstrap DHT node and N `moe-peer` processes hosting a tiny model's experts
(replication R, or `--experts auto`), drives generation (or layer calls) through one or
more coordinators, and meanwhile runs a fault schedule (from `--seed` or a file): peers
SIGKILLed, gracefully stopped, SIGSTOPped, restarted, new peers joining; some peers slowed,
with added latency, jitter and loss (peer/impair.py). At the end: a report of requests,
tokens exact/rerouted/dropped, latency percentiles, retries/hedges/bans and per-peer load
and uptime; `--json` and `--plot` write it for machines and people. Every process started
is stopped on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from coordinator.client import SwarmClient
from coordinator.dispatch.dispatcher import FALLBACK_POLICIES, DispatchStats
from coordinator.dispatch.stats import percentile
from coordinator.sim.local_swarm import LaunchError, LocalSwarm, Process
from coordinator.sim.schedule import (
    DOWN_ACTIONS,
    FaultEvent,
    PeerPlan,
    load_schedule,
    make_schedule,
    parse_weights,
    plan_peers,
)

TICK_S = 0.1
SAMPLE_S = 0.5  # peer-count timeline resolution
SETTLE_S = 2.0  # > the coordinators' DHT refresh period (1 s) plus an announcement's propagation
PEER_FLAGS = ["--threads", "1", "--drain-timeout", "2"]


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


# ---- the workload ----------------------------------------------------------------------


@dataclass
class Workload:
    """What a coordinator sends: `requests[i % n]` is request i; `check` compares with the local reference."""

    uids: list[str]
    make_runner: Callable[[SwarmClient], Callable[[int], object]]
    check: Callable[[int, object], bool]
    tokens_per_request: int
    peer_args: list[str]
    expert_bytes: int
    num_experts: int


def generation_workload(args: argparse.Namespace) -> Workload:
    from transformers import AutoModelForCausalLM

    from coordinator.commands.generate import greedy
    from coordinator.models.hf import checkpoint_info, load_swarm_model
    from coordinator.models.tiny import VOCAB, ensure_tiny_checkpoint
    from protos.hf_checkpoint import HFCheckpoint

    ckpt = ensure_tiny_checkpoint(args.cache, args.family, args.model_seed)
    info = checkpoint_info(ckpt)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, VOCAB, (1, args.prompt_tokens), generator=gen) for _ in range(8)]
    local = AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="eager").eval()
    want = [greedy(local, ids, args.new_tokens).output_ids for ids in prompts]
    one = HFCheckpoint(ckpt).read_expert(*min(info.checkpoint.experts))

    def make_runner(client: SwarmClient) -> Callable[[int], object]:
        model = load_swarm_model(ckpt, client, info=info)
        return lambda i: greedy(model, prompts[i % len(prompts)], args.new_tokens).output_ids

    return Workload(
        uids=info.uids,
        make_runner=make_runner,
        check=lambda i, out: torch.equal(out, want[i % len(want)]),
        tokens_per_request=args.new_tokens,
        peer_args=["--model", str(ckpt)],
        expert_bytes=sum(t.numel() * t.element_size() for t in one.values()),
        num_experts=info.checkpoint.num_experts,
    )


def layer_workload(args: argparse.Namespace) -> Workload:
    from coordinator.models.toy_stack import LocalExperts, ToyMoEStack
    from protos import toy_model
    from protos.toy_model import ToyConfig

    config = ToyConfig(num_layers=2, num_experts=8, hidden_dim=64, ffn_dim=128, top_k=2)
    ckpt = args.cache / f"toy-s{args.model_seed}"
    if not (ckpt / "moe_swarm.json").is_file():
        toy_model.save_checkpoint(ckpt, config, seed=args.model_seed)
    manifest = toy_model.read_manifest(ckpt)
    gen = torch.Generator().manual_seed(args.seed)
    inputs = [torch.randn(args.tokens, config.hidden_dim, generator=gen) for _ in range(8)]
    local = ToyMoEStack.from_checkpoint(ckpt, LocalExperts.from_checkpoint(ckpt))
    want = [local(x) for x in inputs]

    def make_runner(client: SwarmClient) -> Callable[[int], object]:
        stack = ToyMoEStack.from_checkpoint(ckpt, client)
        return lambda i: stack(inputs[i % len(inputs)])

    return Workload(
        uids=manifest.uids(),
        make_runner=make_runner,
        check=lambda i, out: (out - want[i % len(want)]).abs().max().item() <= 1e-5,
        tokens_per_request=args.tokens,
        peer_args=["--checkpoint", str(ckpt)],
        expert_bytes=3 * config.hidden_dim * config.ffn_dim * 4,
        num_experts=config.num_experts,
    )


@dataclass
class RequestRecord:
    t: float  # start, seconds after the load started
    ms: float
    ok: bool
    match: bool  # equal to the local model's answer
    coordinator: int
    error: str = ""


class LoadThread(threading.Thread):
    """One coordinator's request loop: back to back until stopped."""

    def __init__(
        self, index: int, client: SwarmClient, run: Callable[[int], object], check, t0: float, rate: float = 0.0
    ) -> None:
        super().__init__(name=f"load-{index}", daemon=True)  # daemon: a hung RPC never blocks exit
        self.index, self.client, self.run_one, self.check, self.t0 = index, client, run, check, t0
        self.rate = rate
        self.records: list[RequestRecord] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = self.index * 1000  # coordinators cycle through the prompts from different offsets
        sent = 0
        while not self.stop.is_set():
            if self.rate > 0 and self.stop.wait(max(0.0, self.t0 + sent / self.rate - time.monotonic())):
                break  # paced: request n starts at n / rate (later if the previous one ran long)
            sent += 1
            start = time.monotonic()
            try:
                out = self.run_one(i)
                ok, match, error = True, self.check(i, out), ""
            except Exception as e:  # a failure reaching the user: counted, never hidden
                ok, match, error = False, False, f"{type(e).__name__}: {e}"[:300]
            self.records.append(
                RequestRecord(start - self.t0, (time.monotonic() - start) * 1e3, ok, match, self.index, error)
            )
            i += 1


# ---- the peers -------------------------------------------------------------------------


@dataclass
class SimPeer:
    plan: PeerPlan
    proc: Process | None = None
    state: str = "down"  # starting | up | stalled | down
    exiting: list[Process] = field(default_factory=list)  # stopped incarnations still draining/shutting down
    since: float = 0.0  # when it entered `state` (monotonic)
    uptime_s: float = 0.0
    restarts: int = 0
    joined_at: float = 0.0
    ready_at: float = 0.0  # monotonic time its current incarnation became ready
    experts: set[str] = field(default_factory=set)  # uids its current incarnation serves
    peer_ids: list[str] = field(default_factory=list)  # one per incarnation


@dataclass
class Pending:
    """A timer: restart a downed peer, or SIGCONT a stalled one, at `due` (monotonic)."""

    due: float
    action: str  # restart | cont
    peer: str


class Simulation:
    def __init__(self, args: argparse.Namespace, swarm: LocalSwarm, workload: Workload, plans: list[PeerPlan]) -> None:
        self.args, self.swarm, self.workload = args, swarm, workload
        self.peers = {p.name: SimPeer(p) for p in plans}
        self.hosted_ever: dict[str, set[str]] = {}  # uid -> peers that served it at some point
        self.timers: list[Pending] = []
        self.events: list[dict] = []  # what happened, with real times
        self.peer_timeline: list[tuple[float, int]] = []
        self.t0 = time.monotonic()
        self.setup_s = 0.0  # checkpoint, peers and coordinators up, before the load started

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _peer_args(self, plan: PeerPlan) -> list[str]:
        args = [*self.workload.peer_args, "--experts", plan.experts, *PEER_FLAGS]
        args += ["--announce-period", str(self.args.announce_period), *plan.args()]
        if plan.experts == "auto":
            per_peer = max(1, round(len(self.workload.uids) * self.args.replication / self.args.peers))
            args += ["--memory-budget", str(per_peer * self.workload.expert_bytes)]
        return args

    def _set(self, peer: SimPeer, state: str) -> None:
        now = time.monotonic()
        if peer.state == "up":
            peer.uptime_s += now - peer.since
        peer.state, peer.since = state, now

    def log(self, action: str, peer: str, note: str = "", planned: float | None = None, pid: int | None = None) -> None:
        self.events.append(
            {"t": round(self.now(), 3), "action": action, "peer": peer, "planned_t": planned, "pid": pid, "note": note}
        )

    # ---- starting -------------------------------------------------------------------------
    def launch(self, peer: SimPeer) -> None:
        if peer.proc is None:
            peer.proc = self.swarm.launch_peer(peer.plan.name, *self._peer_args(peer.plan))
        else:
            peer.proc = self.swarm.relaunch(peer.proc)
            peer.restarts += 1
        self._set(peer, "starting")

    def poll(self) -> None:
        """Advance starting peers, reap exited ones (non-blocking) and fire due timers."""
        for peer in self.peers.values():
            for proc in [p for p in peer.exiting if not p.alive()]:
                code = self.swarm.stop(proc, timeout=1)  # reaps it and anything left in its group
                peer.exiting.remove(proc)
                self.log("exited", peer.plan.name, f"exit code {code}", pid=proc.pid)
            if peer.state == "starting":
                try:
                    ready = self.swarm.poll_ready(peer.proc)
                except LaunchError as e:
                    self._set(peer, "down")
                    self.log("start-failed", peer.plan.name, str(e).splitlines()[0])
                    continue
                if ready:
                    info = peer.proc.info
                    peer.experts = set(info.get("experts", []))
                    peer.peer_ids.append(info["peer_id"])
                    for uid in peer.experts:
                        self.hosted_ever.setdefault(uid, set()).add(peer.plan.name)
                    peer.ready_at = time.monotonic()
                    self._set(peer, "up")
                    self.log("ready", peer.plan.name, pid=peer.proc.pid)
        now = time.monotonic()
        for timer in [t for t in self.timers if t.due <= now]:
            peer = self.peers[timer.peer]
            if timer.action == "cont" and peer.state == "stalled":
                peer.proc.signal(signal.SIGCONT)
                self._set(peer, "up")
                self.log("resumed", peer.plan.name, pid=peer.proc.pid)
            elif timer.action == "restart" and peer.state == "down":
                self.launch(peer)
                self.log("restart", peer.plan.name, pid=peer.proc.pid)
            self.timers.remove(timer)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in ("up", "starting", "stalled", "down")}
        for peer in self.peers.values():
            out[peer.state] += 1
        return out

    # ---- faults ---------------------------------------------------------------------------
    def last_replica_of(self, victim: SimPeer) -> str | None:
        """An expert that only `victim` serves now although other peers served it before, if any.

        A replica counts once it has been up for SETTLE_S: coordinators must have seen its
        announcement, or taking the victim down would leave them no replica they know of."""
        settled = time.monotonic() - SETTLE_S
        for uid in sorted(victim.experts):
            others = [self.peers[o] for o in self.hosted_ever.get(uid, set()) - {victim.plan.name}]
            if others and not any(o.state == "up" and o.ready_at <= settled and uid in o.experts for o in others):
                return uid
        return None

    def apply(self, event: FaultEvent) -> bool:
        """Run one event; False to try again later (it would take the last live replica of an expert)."""
        if event.action == "join":
            plan = PeerPlan(event.peer, event.experts, -1)
            peer = self.peers[event.peer] = SimPeer(plan, joined_at=time.monotonic())
            self.launch(peer)
            self.log("join", event.peer, event.experts, event.at, peer.proc.pid)
            return True
        peer = self.peers.get(event.peer)
        if peer is None:
            self.log("skipped", event.peer, f"{event.action}: no such peer", event.at)
            return True
        if event.action == "restart":
            self.timers.append(Pending(time.monotonic(), "restart", peer.plan.name))
            return True
        if peer.state != "up":
            self.log("skipped", event.peer, f"{event.action}: peer is {peer.state}", event.at)
            return True
        if self.last_replica_of(peer) is not None:
            return False
        pid = peer.proc.pid
        if event.action == "kill":
            self.swarm.stop(peer.proc, signal.SIGKILL, timeout=5)  # the group: it and its p2pd, like a dead machine
            self._set(peer, "down")
        elif event.action == "stop":
            # it drains, withdraws and exits (which can take a while); a restart need not wait for that
            peer.proc.signal(signal.SIGTERM)
            peer.exiting.append(peer.proc)
            self._set(peer, "down")
        else:
            peer.proc.signal(signal.SIGSTOP)
            self._set(peer, "stalled")
            self.timers.append(Pending(time.monotonic() + event.duration, "cont", peer.plan.name))
        if event.action in ("kill", "stop") and event.duration > 0:
            self.timers.append(Pending(time.monotonic() + event.duration, "restart", peer.plan.name))
        self.log(event.action, event.peer, f"for {event.duration:g}s" if event.duration else "", event.at, pid)
        return True

    def close(self) -> None:
        """Resume stalled peers (a stopped process ignores SIGTERM) and account the last uptime."""
        for peer in self.peers.values():
            if peer.state == "stalled" and peer.proc is not None:
                peer.proc.signal(signal.SIGCONT)
            self._set(peer, peer.state)  # closes the open uptime interval


# ---- running ---------------------------------------------------------------------------


def build_plan(args: argparse.Namespace, num_experts: int) -> tuple[list[PeerPlan], list[FaultEvent]]:
    plans = plan_peers(
        args.peers,
        num_experts,
        args.replication,
        args.seed,
        auto=args.experts == "auto",
        slow_fraction=args.slow_fraction,
        slowdown=args.slowdown,
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        loss=args.loss,
    )
    if args.schedule:
        events = load_schedule(args.schedule, [p.name for p in plans])
    else:
        events = make_schedule(
            plans,
            args.seed,
            args.duration,
            interval=args.fault_interval,
            weights=parse_weights(args.faults),
            downtime=args.downtime,
            stall=args.stall,
        )
    return plans, events


def merge_stats(all_stats: list[DispatchStats]) -> DispatchStats:
    total = DispatchStats()
    for s in all_stats:
        for name in ("layer_calls", "rpcs", "routed", "exact", "rerouted", "dropped", "retries", "hedges", "bans"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        total.refusals += s.refusals
        total.rpc_ms += s.rpc_ms
        for layer, ms in s.layer_ms.items():
            total.layer_ms.setdefault(layer, []).extend(ms)
        total.rpcs_by_peer.update(s.rpcs_by_peer)
        total.rows_by_peer.update(s.rows_by_peer)
    return total


def _pcts(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": (round(percentile(values, q), 3) if values else None) for q in (50, 95, 99)}


def build_report(
    args: argparse.Namespace, sim: Simulation, records: list[RequestRecord], stats: DispatchStats, seconds: float
) -> dict:
    ok = [r for r in records if r.ok]
    by_id = {pid: name for name, p in sim.peers.items() for pid in p.peer_ids}
    peers = []
    for name, p in sim.peers.items():
        ids = set(p.peer_ids)
        lifetime = seconds - max(0.0, p.joined_at - sim.t0)
        peers.append(
            {
                "name": name,
                "experts": p.plan.experts,
                "impairment": p.plan.impairment,
                "restarts": p.restarts,
                "uptime_s": round(p.uptime_s, 2),
                "uptime_frac": round(min(p.uptime_s / lifetime, 1.0), 3) if lifetime > 0 else 0.0,
                "rpcs": sum(n for pid, n in stats.rpcs_by_peer.items() if pid in ids),
                "rows": sum(n for pid, n in stats.rows_by_peer.items() if pid in ids),
                "final_state": p.state,
            }
        )
    layer_ms = [ms for calls in stats.layer_ms.values() for ms in calls]
    errors = sorted({r.error for r in records if r.error})
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "duration_s": round(seconds, 2),
        "setup_s": round(sim.setup_s, 2),
        "requests": {
            "total": len(records),
            "ok": len(ok),
            "failed": len(records) - len(ok),
            "success_rate": len(ok) / len(records) if records else None,
            "match_local": sum(r.match for r in records),
            "latency_ms": _pcts([r.ms for r in ok]),
            "errors": errors[:10],
        },
        "tokens": {
            "generated" if args.load == "generate" else "processed": len(ok) * sim.workload.tokens_per_request,
            "routed": stats.routed,
            "exact": stats.exact,
            "rerouted": stats.rerouted,
            "dropped": stats.dropped,
            "consistent": stats.exact + stats.rerouted + stats.dropped == stats.routed,
        },
        "dispatch": {
            "layer_calls": stats.layer_calls,
            "rpcs": stats.rpcs,
            "retries": stats.retries,
            "hedges": stats.hedges,
            "bans": stats.bans,
            "refusals": stats.refusals,
            "layer_ms": _pcts(layer_ms),
            "rpc_ms": _pcts(stats.rpc_ms),
            "rpcs_to_unknown_peers": sum(n for pid, n in stats.rpcs_by_peer.items() if pid not in by_id),
        },
        "faults": {a: sum(e["action"] == a for e in sim.events) for a in (*DOWN_ACTIONS, "restart", "join", "skipped")},
        "peers": peers,
        "events": sim.events,
        "timeline": {
            "requests": [[round(r.t, 3), round(r.ms, 2), r.ok, r.match] for r in records],
            "peers_up": sim.peer_timeline,
        },
    }


def live_view(sim: Simulation, records: list[RequestRecord], stats: DispatchStats, duration: float) -> Group:
    c = sim.counts()
    ok = sum(r.ok for r in records)
    recent = [r.ms for r in records[-50:] if r.ok]
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"[bold]t {sim.now():5.1f}/{duration:g}s",
        f"peers up {c['up']}/{len(sim.peers)} (starting {c['starting']}, stalled {c['stalled']}, down {c['down']})",
    )
    head.add_row(
        f"requests {len(records)}: {ok} ok, {len(records) - ok} failed",
        f"latency p50 {percentile(recent, 50):.0f} ms (last 50); tokens routed {stats.routed}: exact "
        f"{stats.exact}, rerouted {stats.rerouted}, dropped {stats.dropped}; retries {stats.retries}, "
        f"hedges {stats.hedges}, bans {stats.bans}",
    )
    events = Table("t", "event", "peer", "note", title="recent events", title_justify="left")
    for e in sim.events[-6:]:
        events.add_row(f"{e['t']:.1f}", e["action"], e["peer"], e["note"])
    return Group(head, events)


def print_report(console: Console, report: dict) -> None:
    req, tok, dis = report["requests"], report["tokens"], report["dispatch"]
    summary = Table(title=f"simulation: {report['duration_s']}s of load", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    rate = "n/a" if req["success_rate"] is None else f"{100 * req['success_rate']:.1f}%"
    summary.add_row("requests", f"{req['total']} ({req['ok']} ok, {req['failed']} failed): {rate} complete")
    summary.add_row("equal to the local model", f"{req['match_local']} of {req['total']}")
    summary.add_row("request latency ms", "  ".join(f"{k} {v}" for k, v in req["latency_ms"].items()))
    summary.add_row("layer call latency ms", "  ".join(f"{k} {v}" for k, v in dis["layer_ms"].items()))
    summary.add_row(
        "token-expert pairs",
        f"{tok['routed']} routed = {tok['exact']} exact + {tok['rerouted']} rerouted + {tok['dropped']} dropped"
        + ("" if tok["consistent"] else "  [red]INCONSISTENT"),
    )
    summary.add_row(
        "dispatch",
        f"{dis['layer_calls']} layer calls, {dis['rpcs']} RPCs, {dis['retries']} retries, {dis['hedges']} hedges, "
        f"{dis['bans']} bans, {dis['refusals']} refusals",
    )
    summary.add_row("faults", ", ".join(f"{k} {v}" for k, v in report["faults"].items()))
    for err in req["errors"][:3]:
        summary.add_row("[red]error", err)
    console.print(summary)
    peers = Table(title="per peer")
    for col in ("peer", "experts", "impairment", "restarts", "uptime", "RPCs", "rows", "state"):
        peers.add_column(col)
    for p in report["peers"]:
        imp = ", ".join(f"{k.removeprefix('sim-')}={v}" for k, v in p["impairment"].items() if k != "sim-seed")
        peers.add_row(
            p["name"],
            p["experts"],
            imp or "-",
            str(p["restarts"]),
            f"{100 * p['uptime_frac']:.0f}%",
            str(p["rpcs"]),
            str(p["rows"]),
            p["final_state"],
        )
    console.print(peers)


def plot_report(report: dict, path: Path) -> None:
    """Request latency and live peers over time, fault events marked."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install -e '.[sim]'") from e
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(10, 6), height_ratios=[3, 1])
    reqs = report["timeline"]["requests"]
    for ok, match, style, label in (
        (True, True, dict(color="tab:blue", marker="."), "ok, equal to local"),
        (True, False, dict(color="tab:orange", marker="."), "ok, differs (rerouted/dropped)"),
        (False, False, dict(color="tab:red", marker="x"), "failed"),
    ):
        pts = [(t, ms) for t, ms, o, m in reqs if o == ok and (m == match or not ok)]
        if pts:
            ax1.scatter(*zip(*pts, strict=True), s=14, label=label, **style)
    ax1.set_ylabel("request latency (ms)")
    ax1.set_title(
        f"moe-swarm simulate: {report['config']['peers']} peers, replication {report['config']['replication']}, "
        f"seed {report['config']['seed']}"
    )
    ups = report["timeline"]["peers_up"]
    if ups:
        ax2.step(*zip(*ups, strict=True), where="post", color="tab:green")
    ax2.set_ylabel("peers up")
    ax2.set_xlabel("seconds since the load started")
    colors = {"kill": "red", "stop": "purple", "stall": "orange", "restart": "green", "join": "blue"}
    seen = set()
    for e in report["events"]:
        if e["action"] in colors:
            label = e["action"] if e["action"] not in seen else None
            seen.add(e["action"])
            for ax in (ax1, ax2):
                ax.axvline(e["t"], color=colors[e["action"]], alpha=0.5, lw=1, label=label if ax is ax1 else None)
    ax1.legend(loc="upper right", fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    console = console or Console(stderr=True)
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
            )
            clients.append(client)
            client.wait_for_experts(timeout=60)
            threads.append(LoadThread(i, client, workload.make_runner(client), workload.check, 0.0, args.rate))
        console.print(f"swarm up and {len(clients)} coordinator(s) ready in {time.monotonic() - started:.1f}s")
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

    def records() -> list[RequestRecord]:
        return sorted((r for t in threads for r in list(t.records)), key=lambda r: r.t)

    with Live(console=console, refresh_per_second=4, transient=True, auto_refresh=not args.no_live) as live:
        while sim.now() < args.duration:
            if _INTERRUPTED.is_set():
                raise KeyboardInterrupt  # a Ctrl-C whose exception was swallowed on its way
            sim.poll()
            for event in [e for e in pending if e.at <= sim.now()]:
                if sim.apply(event):
                    if id(event) in deferred_since:
                        sim.events[-1]["note"] += f" (deferred {sim.now() - deferred_since.pop(id(event)):.1f}s)"
                    pending.remove(event)
                elif sim.now() - deferred_since.setdefault(id(event), sim.now()) > args.max_defer:
                    sim.log("skipped", event.peer, f"{event.action}: would take the last replica", event.at)
                    pending.remove(event)
            if sim.now() - last_sample >= SAMPLE_S:
                last_sample = sim.now()
                sim.peer_timeline.append((round(last_sample, 2), sim.counts()["up"]))
            if not args.no_live:
                stats = merge_stats([c.dispatcher.stats for c in clients])
                live.update(live_view(sim, records(), stats, args.duration))
            time.sleep(TICK_S)
        for t in threads:
            t.stop.set()
        for t in threads:  # the requests in flight finish: they count
            t.join(args.timeout * 3)
    seconds = sim.now()
    sim.close()
    sim.peer_timeline.append((round(seconds, 2), sim.counts()["up"]))
    report = build_report(args, sim, records(), merge_stats([c.dispatcher.stats for c in clients]), seconds)
    report["schedule"] = [e.to_dict() for e in schedule]
    print_report(Console(), report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot_report(report, args.plot)
    return report


def run_simulate(args: argparse.Namespace) -> int:
    if args.dry_run:
        num_experts = 8  # both tiny workloads have 8 experts per layer
        plans, schedule = build_plan(args, num_experts)
        print(
            json.dumps(
                {"peers": [vars(p) for p in plans], "schedule": [e.to_dict() for e in schedule]},
                indent=1,
            )
        )
        return 0
    try:
        report = run_simulation(args)
    except KeyboardInterrupt:
        print("moe-swarm simulate: interrupted; every process it started is stopped", flush=True)
        return 130
    ok = report["requests"]["failed"] == 0 and report["tokens"]["consistent"]
    return 0 if ok else 1
