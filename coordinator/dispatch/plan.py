"""Which peer computes which rows: group positions by expert, then experts by chosen replica."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from coordinator.dispatch.health import HealthCache
from coordinator.dispatch.swarm import Replica, SwarmView


@dataclass
class PeerCall:
    """The rows one peer computes in one layer call."""

    replica: Replica
    experts: list[int] = field(default_factory=list)
    segments: list[tuple[str, int]] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)  # indices into the slot-major (slot, token) list

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.segments)


def group_by_expert(flat_experts: np.ndarray) -> dict[int, np.ndarray]:
    """expert -> its positions in `flat_experts`, ascending (stable).

    Index bookkeeping is numpy: its small ops cost a fraction of torch's, and on a coordinator
    whose caches the peers' compute keeps flushing, every op on the path to the wire counts."""
    order = np.argsort(flat_experts, kind="stable")
    ends = np.cumsum(np.bincount(flat_experts)).tolist()
    groups, start = {}, 0
    for expert, end in enumerate(ends):
        if end > start:
            groups[expert] = order[start:end]
        start = end
    return groups


class Planner:
    """Replica choice: the cheapest by expected latency, preferring peers already in the call."""

    def __init__(self, swarm: SwarmView, health: HealthCache, rng: random.Random) -> None:
        self.swarm = swarm
        self.health = health
        self.rng = rng

    def cost_ms(self, replica: Replica) -> float:
        """Expected latency: observed round trip + queued rows / announced throughput."""
        health = self.health.get(replica.peer_id)
        queued = replica.record.load + health.inflight_rows
        per_row_ms = 1000.0 / replica.record.throughput if replica.record.throughput > 0 else 0.01
        return self.health.expected_ms(replica.peer_id, default_ms=1.0) + queued * per_row_ms

    def choose(self, uid: str, already: dict[str, PeerCall], exclude: set[str] = frozenset()) -> Replica | None:
        replicas = [
            r for r in self.swarm.replicas(uid) if r.peer_id not in exclude and not self.health.banned(r.peer_id)
        ]
        if not replicas:
            return None
        if len(replicas) == 1:
            return replicas[0]
        in_call = [r for r in replicas if r.peer_id in already]
        if in_call:  # fewer RPCs: one per peer per layer
            return in_call[0] if len(in_call) == 1 else min(in_call, key=self.cost_ms)
        # two random choices: close to the best, without every coordinator herding onto it
        return min(self.rng.sample(replicas, 2), key=self.cost_ms)

    def plan(
        self, work: dict[int, np.ndarray], uids: list[str], exclude: dict[int, set[str]] | None = None
    ) -> tuple[list[PeerCall], list[int]]:
        """Assign each expert's positions to a replica; returns the calls and the experts without one."""
        exclude = exclude or {}
        calls: dict[str, PeerCall] = {}
        missing = []
        for expert in sorted(work):
            replica = self.choose(uids[expert], calls, exclude.get(expert, set()))
            if replica is None:
                missing.append(expert)
                continue
            call = calls.setdefault(replica.peer_id, PeerCall(replica))
            call.experts.append(expert)
            call.segments.append((uids[expert], len(work[expert])))
            call.positions.append(work[expert])
        return list(calls.values()), missing
