"""Dispatch one MoE layer's token rows to remote experts: one RPC per peer per layer.

Rows are grouped by expert, experts by the replica chosen for them, and each peer gets a
single Forward with all its segments. Outputs come back in request order and are placed
at their (token, slot) positions, so the caller combines them in the original order.

Failures never reach the user while a replica remains: one deadline covers the whole
layer call; a failed or refused call is retried on the next replica; a call slower than
the peer's observed p95 gets a hedged duplicate on another replica (first answer wins, the
other is cancelled). Experts that no replica answers in time get the fallback policy
(reroute / drop / error), and every (token, slot) is counted exact, rerouted or dropped.

The parts: plan (replica choice, believing claims as far as observed), probe (reachability
of replicas not heard from), exchange (one RPC), layer_call (a round of RPCs under one
deadline), verify (receipts and what they commit to), spot (spot checks that decide), trust
(bans and verified history across runs), referee (local recomputation), fallback, result and stats.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from coordinator.dispatch.exchange import Exchange
from coordinator.dispatch.fallback import FALLBACK_POLICIES, ScoresFn, reroute, unavailable
from coordinator.dispatch.health import HealthCache
from coordinator.dispatch.layer_call import LayerCall
from coordinator.dispatch.plan import PeerCall, Planner, group_by_expert
from coordinator.dispatch.referee import Referee
from coordinator.dispatch.result import (
    DispatchError,
    DispatchResult,
    ExpertUnavailableError,
    RemoteExpertError,
    scatter,
)
from coordinator.dispatch.spot import SpotChecks
from coordinator.dispatch.stats import DispatchStats
from coordinator.dispatch.swarm import Replica, SwarmView
from coordinator.dispatch.transport import Channels, Sessions
from coordinator.dispatch.trust import TrustStore
from coordinator.dispatch.verify import DeferredReceipts
from protos.records import parse_expert_uid

__all__ = [
    "FALLBACK_POLICIES",
    "DispatchError",
    "DispatchResult",
    "DispatchStats",
    "Dispatcher",
    "ExpertUnavailableError",
    "RemoteExpertError",
    "ScoresFn",
]


class Dispatcher:
    """One per coordinator: its parts share its health cache, stats and random generator."""

    def __init__(
        self,
        swarm: SwarmView,
        channels: Channels,
        timeout: float = 30.0,
        *,
        fallback: str = "error",
        hedge: bool = True,
        hedge_default_ms: float = 250.0,
        hedge_min_ms: float = 5.0,
        health: HealthCache | None = None,
        sessions: Sessions | None = None,
        spot_check: float = 0.0,
        spot_tolerance: float | None = None,
        seed: int | None = None,
        trust: TrustStore | None = None,
        referee: Referee | None = None,
        local: bool = True,
    ) -> None:
        """`trust`: bans and verified histories kept across runs (in memory without one);
        `referee`: recomputes experts the coordinator holds, to settle spot-check disputes;
        `local`: the swarm runs on loopback/private addresses (distinct ports there may be
        distinct operators; in a public swarm a shared host means a shared operator)."""
        if fallback not in FALLBACK_POLICIES:
            raise ValueError(f"fallback must be one of {FALLBACK_POLICIES}, got {fallback!r}")
        if not 0.0 <= spot_check <= 1.0:
            raise ValueError(f"spot_check is a fraction of calls in [0, 1], got {spot_check}")
        self.swarm = swarm
        self.channels = channels
        self.timeout = timeout  # one deadline for a whole layer call: lookups, retries, hedges
        self.fallback = fallback
        self.hedge = hedge
        self.hedge_default_ms = hedge_default_ms
        self.hedge_min_ms = hedge_min_ms
        self.health = health or HealthCache()
        self.sessions = sessions  # None: plaintext requests (peers must run --allow-plaintext)
        self.spot_check = spot_check
        self.stats = DispatchStats()
        self.trust = trust or TrustStore()
        for peer, seconds in self.trust.bans().items():  # a cheater does not start clean every run
            self.health.ban(peer, seconds)
            self.stats.banned_at_start += 1
        rng = random.Random(seed)  # one generator: replica choice and spot sampling draw from it in turn
        self.planner = Planner(swarm, self.health, rng, self.trust)
        self.receipts = DeferredReceipts(self.health, self.stats)
        self.spot = SpotChecks(
            spot_check, spot_tolerance, rng, self.health, self.stats, self.trust, self.receipts, referee
        )
        self.spot.local = local
        # with sessions a receipt is evidence only: checked after the call, or at once when disputed
        self.exchange = Exchange(channels, sessions, self.stats, self.receipts, sessions is not None)

    def choose(self, uid: str, already: dict[str, PeerCall], exclude: set[str] = frozenset()) -> Replica | None:
        return self.planner.choose(uid, already, exclude)

    def plan(
        self, work: dict[int, np.ndarray], uids: list[str], exclude: dict[int, set[str]] | None = None
    ) -> tuple[list[PeerCall], list[int]]:
        return self.planner.plan(work, uids, exclude)

    async def dispatch(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        uids: list[str],
        dtype: torch.dtype,
        scores: ScoresFn = None,
    ) -> DispatchResult:
        """x [T, H], experts [T, k] -> outputs [T, k, H] (row t, slot j = expert experts[t, j] of x[t]).

        Each expert's rows are sent slot-major ((slot, token) order), the order in which
        transformers' eager MoE gathers them, so a peer runs the very GEMM a local model would.
        `scores()` gives router scores [T, E] (higher is better) for the `reroute` fallback;
        it is only called when some expert could not be reached.
        """
        try:
            return await self._dispatch(x, experts, uids, dtype, scores)
        finally:
            self.receipts.check_later()

    async def _dispatch(
        self, x: torch.Tensor, experts: torch.Tensor, uids: list[str], dtype: torch.dtype, scores: ScoresFn
    ) -> DispatchResult:
        started = time.perf_counter()
        num_tokens, k = experts.shape
        flat = experts.T.reshape(-1).numpy().copy()  # slot-major; a copy the reroute may edit
        first = LayerCall(self, group_by_expert(flat), x, uids, dtype)
        await first.run()
        if self.spot_check > 0:
            await self.spot.check(first)
        missing = [e for e in first.work if e not in first.answers]
        if missing and self.fallback == "error":
            raise unavailable(missing, first, self.timeout)
        rerouted = 0
        if missing and self.fallback == "reroute" and scores is not None:
            rerouted = await reroute(missing, first, flat, experts, scores())
        result, dropped = scatter(first.work, first.answers, flat, num_tokens, k, x.shape[-1], dtype)
        layer = parse_expert_uid(uids[0])[1]
        self.stats.record_layer(layer, flat.size, rerouted, dropped, (time.perf_counter() - started) * 1e3)
        return result
