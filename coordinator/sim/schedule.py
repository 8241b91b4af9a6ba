"""The churn simulator's plan: which peer hosts what, how it is impaired, and when it fails.

Everything here is a pure function of the configuration and `--seed` (or of a schedule
file), so two runs with the same seed meet the same faults in the same order; only the
timings are real. The simulator itself (coordinator/sim/simulate.py) executes the plan.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from protos.expert_spec import expert_slices

# kill: SIGKILL the peer's process group (a machine dying); stop: SIGTERM (drain, withdraw, exit);
# stall: SIGSTOP for `duration` s then SIGCONT (a straggler); restart: start a downed peer again;
# join: a new peer (hosting `experts`) enters the swarm
ACTIONS = ("kill", "stop", "stall", "restart", "join")
DOWN_ACTIONS = ("kill", "stop", "stall")


@dataclass(frozen=True)
class FaultEvent:
    at: float  # seconds after the load started
    action: str
    peer: str
    duration: float = 0.0  # kill/stop: restart after this many seconds (0: stays down); stall: SIGSTOP length
    experts: str = ""  # join: the new peer's --experts spec

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; known: {', '.join(ACTIONS)}")
        if self.at < 0 or self.duration < 0:
            raise ValueError(f"fault event times must be >= 0: {self}")
        if self.action == "join" and not self.experts:
            raise ValueError(f"a join event needs an experts spec: {self}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v or k in ("at", "action", "peer")}


@dataclass(frozen=True)
class PeerPlan:
    name: str
    experts: str  # --experts spec ('*:0-1', or 'auto')
    group: int  # peers of one group host the same experts (replicas of each other)
    impairment: dict[str, float] = field(default_factory=dict)  # --sim-* flag -> value

    def args(self) -> list[str]:
        return [arg for flag, value in sorted(self.impairment.items()) for arg in (f"--{flag}", str(value))]


def expert_groups(num_experts: int, num_peers: int, replication: int) -> list[str]:
    """One --experts spec per replica group: the experts of every layer split into num_peers // replication slices."""

    if replication < 1 or num_peers < replication:
        raise ValueError(f"need 1 <= replication <= peers, got replication {replication} with {num_peers} peers")
    return expert_slices(num_experts, min(num_peers // replication, num_experts))


CHEAT_SCALE = 0.05  # a cheating peer's outputs are scaled by 1 + this


def plan_peers(
    num_peers: int,
    num_experts: int,
    replication: int,
    seed: int,
    *,
    auto: bool = False,
    slow_fraction: float = 0.0,
    slowdown: float = 1.0,
    latency_ms: float = 0.0,
    jitter_ms: float = 0.0,
    loss: float = 0.0,
    cheaters: int = 0,
) -> list[PeerPlan]:
    """Peer i joins group i mod groups; the slowed peers and each peer's latency are drawn from
    `seed`; `cheaters` peers (drawn apart, so the other draws stay as they are) corrupt their
    outputs by CHEAT_SCALE and sign them as if honest."""
    specs = ["auto"] if auto else expert_groups(num_experts, num_peers, replication)
    rng = random.Random(seed)
    names = [f"peer{i}" for i in range(num_peers)]
    slowed = set(rng.sample(names, round(slow_fraction * num_peers))) if slowdown > 1 else set()
    if not 0 <= cheaters <= num_peers:
        raise ValueError(f"need 0 <= cheaters <= peers, got {cheaters} with {num_peers} peers")
    cheating = set(random.Random(seed + 1).sample(names, cheaters))
    plans = []
    for i, name in enumerate(names):
        imp: dict[str, float] = {}
        if name in slowed:
            imp["sim-slowdown"] = slowdown
        if latency_ms > 0:  # heterogeneous links: each peer's latency in [0.5, 1.5] x the mean
            imp["sim-latency-ms"] = round(latency_ms * rng.uniform(0.5, 1.5), 2)
        if jitter_ms > 0:
            imp["sim-jitter-ms"] = jitter_ms
        if loss > 0:
            imp["sim-loss"] = loss
        if name in cheating:
            imp["sim-corrupt"] = CHEAT_SCALE
        if imp:
            imp["sim-seed"] = seed * 1000 + i
        plans.append(PeerPlan(name, specs[i % len(specs)], i % len(specs), imp))
    return plans


def make_schedule(
    peers: Sequence[PeerPlan],
    seed: int,
    duration: float,
    *,
    interval: float = 4.0,
    weights: dict[str, float] | None = None,
    downtime: float = 3.0,
    restart_allowance: float = 8.0,
    stall: float = 2.0,
    start: float = 2.0,
) -> list[FaultEvent]:
    """A fault about every `interval` s (+-25%) from `start` until `duration` - `interval` / 2.

    Victims are drawn among peers that are up and whose replica group keeps at least one
    other member up for the whole outage (nominally: a restart is assumed to take
    `restart_allowance` s); a group of one (no replication) has no such protection.
    """
    weights = weights or {"kill": 2, "stop": 1, "stall": 1}
    unknown = set(weights) - {"kill", "stop", "stall", "join"}
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; use kill, stop, stall, join")
    kinds = [k for k, w in weights.items() if w > 0]
    if not kinds:
        return []
    rng = random.Random(seed)
    groups: dict[int, list[str]] = {}
    for p in peers:
        groups.setdefault(p.group, []).append(p.name)
    group_of = {p.name: p.group for p in peers}
    specs = {p.group: p.experts for p in peers}
    busy_until: dict[str, float] = {p.name: 0.0 for p in peers}  # nominally down or restarting until then
    events: list[FaultEvent] = []
    joined = 0
    t = start
    while t < duration - interval / 2:
        kind = rng.choices(kinds, [weights[k] for k in kinds])[0]
        if kind == "join":
            group = joined % len(groups)
            name = f"join{joined}"
            events.append(FaultEvent(round(t, 2), "join", name, experts=specs[group]))
            groups[group].append(name)
            group_of[name] = group
            busy_until[name] = t + restart_allowance  # starting up
            joined += 1
        else:
            candidates = _safe_victims(groups, group_of, busy_until, t)
            if candidates:
                victim = rng.choice(candidates)
                if kind == "stall":
                    events.append(FaultEvent(round(t, 2), "stall", victim, duration=stall))
                    busy_until[victim] = t + stall
                else:
                    events.append(FaultEvent(round(t, 2), kind, victim, duration=downtime))
                    busy_until[victim] = t + downtime + restart_allowance
        t += interval * rng.uniform(0.75, 1.25)
    return events


def _safe_victims(
    groups: dict[int, list[str]], group_of: dict[str, int], busy_until: dict[str, float], t: float
) -> list[str]:
    """Peers up at `t` whose replica group keeps another member up (sorted: draws stay reproducible)."""

    def safe(name: str) -> bool:
        mates = [m for m in groups[group_of[name]] if m != name]
        return busy_until[name] <= t and (not mates or any(busy_until[m] <= t for m in mates))

    return sorted(n for n in busy_until if safe(n))


def parse_weights(spec: str) -> dict[str, float]:
    """'kill=2,stop=1,stall=1,join=0' -> {'kill': 2.0, ...}"""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        out[name.strip()] = float(value) if value else 1.0
    return out


def load_schedule(path: str | Path, peer_names: Sequence[str]) -> list[FaultEvent]:
    """A JSON list of events ({"at": 3, "action": "kill", "peer": "peer0", "duration": 2}), or {"events": [...]}."""
    data = json.loads(Path(path).read_text())
    items = data["events"] if isinstance(data, dict) else data
    events = sorted((FaultEvent(**item) for item in items), key=lambda e: e.at)
    known = set(peer_names) | {e.peer for e in events if e.action == "join"}
    for e in events:
        if e.peer not in known:
            raise ValueError(f"schedule event {e.to_dict()} names unknown peer {e.peer!r}; peers: {sorted(known)}")
    return events


def save_schedule(path: str | Path, events: Sequence[FaultEvent]) -> None:
    Path(path).write_text(json.dumps({"events": [e.to_dict() for e in events]}, indent=1))
