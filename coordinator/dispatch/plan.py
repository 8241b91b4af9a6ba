"""Which peer computes which rows: group positions by expert, then experts by chosen replica."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from coordinator.dispatch.health import HealthCache
from coordinator.dispatch.swarm import Replica, SwarmView
from coordinator.dispatch.trust import TrustStore

# Believing what replicas claim only as far as they have shown it:
MAX_UNTRIED_PER_CALL = 8  # distinct never-answered peers one layer call may send work to
EXPLORE_SHARE = 0.05  # chance that an expert with proven replicas goes to an untried one instead
UNTRIED_ROWS_PER_S = 1000.0  # throughput believed of a peer before it answered (whatever it announces)


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
    """Replica choice: the cheapest by expected latency, preferring peers already in the call and
    peers that have answered before (see `choose`)."""

    def __init__(self, swarm: SwarmView, health: HealthCache, rng: random.Random, trust: TrustStore) -> None:
        self.swarm = swarm
        self.health = health
        self.rng = rng
        self.trust = trust

    def cost_ms(self, replica: Replica) -> float:
        """Expected latency: observed round trip + queued rows / throughput, the announced
        throughput believed only up to what its answers showed (UNTRIED_ROWS_PER_S before any)."""
        health = self.health.get(replica.peer_id)
        queued = replica.record.load + health.inflight_rows
        observed = health.rows_per_s if health.answered else UNTRIED_ROWS_PER_S
        believed = min(replica.record.throughput, observed) if replica.record.throughput > 0 else observed
        per_row_ms = 1000.0 / believed if believed > 0 else 0.01
        return self.health.expected_ms(replica.peer_id, default_ms=1.0) + queued * per_row_ms

    def proven(self, peer: str) -> bool:
        """Answered before: in this process, or verified in an earlier run (the trust store)."""
        return self.health.get(peer).answered > 0 or self.trust.history(peer) > 0

    def candidates(self, uid: str, exclude: set[str] = frozenset()) -> list[Replica]:
        """Replicas of `uid` that may get work now: in the swarm view, not banned, not in `exclude`."""
        return [r for r in self.swarm.replicas(uid) if r.peer_id not in exclude and not self.health.banned(r.peer_id)]

    def usable(self, uid: str) -> bool:
        """Some replica of `uid` is not banned and has shown it answers (a probe or a call)."""
        return any(self.health.get(r.peer_id).reachable or self.proven(r.peer_id) for r in self.candidates(uid))

    def choose(
        self,
        uid: str,
        already: dict[str, PeerCall],
        exclude: set[str] = frozenset(),
        newcomers: set[str] | None = None,
        verifier: bool = False,
    ) -> Replica | None:
        """A replica of `uid` not in `exclude` and not banned. Peers that answered before are
        preferred; a peer never tried gets work only when no such peer is left, or as the
        occasional exploration (EXPLORE_SHARE), and at most MAX_UNTRIED_PER_CALL distinct ones
        per layer call (`newcomers`, the call's record of them). A verifier is one of the
        replicas with the longest verified history."""
        replicas = self.candidates(uid, exclude)
        if verifier and replicas:
            longest = max(self.trust.history(r.peer_id) for r in replicas)
            replicas = [r for r in replicas if self.trust.history(r.peer_id) == longest]
        proven = [r for r in replicas if self.proven(r.peer_id)]
        untried = [r for r in replicas if not self.proven(r.peer_id)]
        if newcomers is not None and len(newcomers) >= MAX_UNTRIED_PER_CALL:
            untried = [r for r in untried if r.peer_id in newcomers]
        if untried and (not proven or self.rng.random() < EXPLORE_SHARE):
            # the probe's verdict first: reachable, then not probed yet, then failed (and not banned any more)
            rank = {True: 0, None: 1, False: 2}
            best = min(rank[self.health.get(r.peer_id).reachable] for r in untried)
            pick = self._cheapest([r for r in untried if rank[self.health.get(r.peer_id).reachable] == best], already)
            if newcomers is not None:
                newcomers.add(pick.peer_id)
            return pick
        return self._cheapest(proven, already) if proven else None

    def _cheapest(self, replicas: list[Replica], already: dict[str, PeerCall]) -> Replica:
        if len(replicas) == 1:
            return replicas[0]
        in_call = [r for r in replicas if r.peer_id in already]
        if in_call:  # fewer RPCs: one per peer per layer
            return in_call[0] if len(in_call) == 1 else min(in_call, key=self.cost_ms)
        # two random choices: close to the best, without every coordinator herding onto it
        return min(self.rng.sample(replicas, 2), key=self.cost_ms)

    def plan(
        self,
        work: dict[int, np.ndarray],
        uids: list[str],
        exclude: dict[int, set[str]] | None = None,
        newcomers: set[str] | None = None,
        verifier: bool = False,
    ) -> tuple[list[PeerCall], list[int]]:
        """Assign each expert's positions to a replica; returns the calls and the experts without one."""
        exclude = exclude or {}
        calls: dict[str, PeerCall] = {}
        missing = []
        for expert in sorted(work):
            replica = self.choose(uids[expert], calls, exclude.get(expert, set()), newcomers, verifier)
            if replica is None:
                missing.append(expert)
                continue
            call = calls.setdefault(replica.peer_id, PeerCall(replica))
            call.experts.append(expert)
            call.segments.append((uids[expert], len(work[expert])))
            call.positions.append(work[expert])
        return list(calls.values()), missing
