"""The simulated swarm's peers: processes started, faulted and restarted on schedule, their states tracked."""

from __future__ import annotations

import argparse
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.sim.local_swarm import LaunchError, LocalSwarm, Process
from coordinator.sim.schedule import FaultEvent, PeerPlan, load_schedule, make_schedule, parse_weights, plan_peers
from coordinator.sim.workload import Workload

# (expert uid, peer id) -> every coordinator would send that peer work for that expert now
Usable = Callable[[str, str], bool]
PEER_FLAGS = ["--threads", "1", "--drain-timeout", "2"]


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
        self.usable: Usable = lambda uid, peer_id: True  # the coordinators' say, once they exist

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

        A replica counts once the coordinators would use it (`usable`: in their swarm views and
        not banned there): one that is up but not yet seen leaves them no replica they know of."""

        def serves(o: SimPeer, uid: str) -> bool:
            return o.state == "up" and uid in o.experts and self.usable(uid, o.peer_ids[-1])

        for uid in sorted(victim.experts):
            others = [self.peers[o] for o in self.hosted_ever.get(uid, set()) - {victim.plan.name}]
            if others and not any(serves(o, uid) for o in others):
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
        cheaters=args.cheaters,
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
