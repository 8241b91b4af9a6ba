"""Pure logic of a layer call's hedges: who is banned when a call is abandoned.

The exchange is replaced by one that answers after a set delay per call, so the round's
timing is exact; the planner, health cache and layer call are the real ones.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from coordinator.dispatch import plan
from coordinator.dispatch.dispatcher import Dispatcher
from coordinator.dispatch.exchange import Answer

from .test_router_plan import FixedView

pytestmark = pytest.mark.unit

UID = "m/0/0"
H = 4


class TimedExchange:
    """Answers the n-th call after delays[n] seconds (None: never), and logs who got each call."""

    def __init__(self, delays: list[float | None]) -> None:
        self.delays = delays
        self.peers: list[str] = []

    async def call(self, call, x, dtype, deadline) -> Answer:
        delay = self.delays[len(self.peers)]
        self.peers.append(call.replica.peer_id)
        await asyncio.sleep(3600 if delay is None else delay)
        return Answer(torch.zeros(call.rows, H, dtype=dtype), delay * 1e3, None)


def dispatch(dispatcher: Dispatcher) -> None:
    x, experts = torch.randn(3, H), torch.zeros(3, 1, dtype=torch.long)
    result = asyncio.run(dispatcher.dispatch(x, experts, [UID], torch.float32))
    assert bool(result.answered.all())


def test_a_hedge_duplicate_beaten_by_the_original_does_not_ban_an_untried_replica(monkeypatch):
    monkeypatch.setattr(plan, "EXPLORE_SHARE", 0.0)  # the proven replica gets the first call
    dispatcher = Dispatcher(FixedView({UID: ["A", "B"]}), channels=None, timeout=5.0, hedge_min_ms=5.0)
    for _ in range(8):  # A has answered in ~10 ms: its hedge time is 10 ms after sending
        dispatcher.health.get("A").observe(10.0, rows=3)
    dispatcher.exchange = TimedExchange([0.08, 1.0])  # A late (hedged to B), then A answers first
    dispatch(dispatcher)
    assert dispatcher.exchange.peers == ["A", "B"] and dispatcher.stats.hedges == 1
    # B only lost a race it joined late: it stays usable, the last replica left if A dies
    assert not dispatcher.health.banned("B") and dispatcher.health.get("B").failures == 0
    assert dispatcher.planner.choose(UID, {}, exclude={"A"}).peer_id == "B"


def test_a_replica_that_never_answered_and_missed_its_hedge_time_is_banned():
    dispatcher = Dispatcher(FixedView({UID: ["A", "B"]}), channels=None, timeout=5.0, hedge_default_ms=30.0)
    dispatcher.exchange = TimedExchange([None, 0.01])  # the first replica chosen accepts and never answers
    dispatch(dispatcher)
    silent, other = dispatcher.exchange.peers
    assert dispatcher.stats.hedges == 1
    assert dispatcher.health.banned(silent) and dispatcher.health.get(silent).failures == 1
    assert not dispatcher.health.banned(other) and dispatcher.health.get(other).answered == 1
