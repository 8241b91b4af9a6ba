"""One round of RPCs for a layer: get every expert of `work` answered once, under one deadline.

The round launches one call per chosen peer, then waits for the first answer or the next
hedge time, whichever comes first. An answer fills the experts it covers; a failure bans
the peer (a refusal does not) and sends its experts to the next replica; a call slower than
its peer's p95 gets a duplicate on another replica (first answer wins). When experts have
no replica and nothing is left to wait for, the DHT is read once more. At the end whatever
is still in flight (hedge losers, calls past the deadline) is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import TYPE_CHECKING

import grpc
import numpy as np
import torch

from coordinator.dispatch.exchange import Answer
from coordinator.dispatch.health import PeerHealth
from coordinator.dispatch.plan import PeerCall
from coordinator.dispatch.result import RemoteExpertError
from coordinator.dispatch.verify import Proof

if TYPE_CHECKING:
    from coordinator.dispatch.dispatcher import Dispatcher

log = logging.getLogger(__name__)

REFRESH_ON_MISS_S = 1.0  # an expert without a replica re-reads the DHT at most this often
# a peer that answered "not serving" (draining, joining) is skipped until the swarm view has
# re-read its record twice (by then the record says so too, or it is back online, e.g. after
# re-placing its experts), and never longer than this
LEAVING_SKIP_S = 30.0


class LayerCall:
    """The state of one round; `run` drives it, the other methods are its steps."""

    __slots__ = (
        "answers",
        "deadline",
        "dispatcher",
        "disputed",
        "dtype",
        "health",
        "hedged",
        "inflight",
        "looked_again",
        "loop",
        "newcomers",
        "proofs",
        "sent_at",
        "stats",
        "tried",
        "uids",
        "unplaced",
        "verifier",
        "work",
        "x",
    )

    def __init__(
        self,
        dispatcher: Dispatcher,
        work: dict[int, np.ndarray],
        x: torch.Tensor,
        uids: list[str],
        dtype: torch.dtype,
        exclude: dict[int, set[str]] | None = None,
        verifier: bool = False,
    ) -> None:
        """`work`: expert -> its slot-major positions; no expert goes to a peer in `exclude[expert]`.
        A `verifier` round (a spot check) prefers peers with a verified history and does not
        re-read the DHT when an expert has no other replica."""
        self.dispatcher = dispatcher
        self.work, self.x, self.uids, self.dtype = work, x, uids, dtype
        self.health, self.stats = dispatcher.health, dispatcher.stats
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + dispatcher.timeout
        self.answers: dict[int, torch.Tensor] = {}
        self.proofs: dict[int, Proof] = {}  # who answered each expert, and the receipt of its call
        self.tried: dict[int, set[str]] = defaultdict(set, {e: set(p) for e, p in (exclude or {}).items()})
        self.inflight: dict[asyncio.Task, PeerCall] = {}
        self.sent_at: dict[asyncio.Task, float] = {}
        self.hedged: set[asyncio.Task] = set()
        self.unplaced: set[int] = set()  # experts that had no replica to go to
        self.disputed: set[int] = set()  # experts whose answers a spot check could not settle (not used)
        self.looked_again = verifier
        self.verifier = verifier
        self.newcomers: set[str] = set()  # never-answered peers this call sent work to (capped)

    async def run(self) -> None:
        self.launch(list(self.work))
        try:
            while True:
                if self.unplaced and not self.inflight and not self.looked_again:
                    await self.look_again()
                if not self.inflight:
                    break
                for task in await self.wait():
                    self.settle(task)
                if all(e in self.answers for e in self.work) or self.loop.time() >= self.deadline:
                    break
                if self.dispatcher.hedge:
                    self.hedge_slow()
        finally:
            if self.inflight:
                await self.abandon_inflight()

    async def round(
        self, work: dict[int, np.ndarray], exclude: dict[int, set[str]] | None = None, verify: bool = False
    ) -> LayerCall:
        """Another round on the same inputs (a spot check, a reroute), with its own deadline."""
        again = LayerCall(self.dispatcher, work, self.x, self.uids, self.dtype, exclude, verify)
        await again.run()
        return again

    # ---- the steps ------------------------------------------------------------------------
    def launch(self, todo: list[int]) -> int:
        """Send `todo`'s experts to replicas not tried yet and not already computing them; returns the calls sent."""
        sub = {e: self.work[e] for e in todo}
        calls, missing = self.dispatcher.planner.plan(
            sub, self.uids, {e: self.tried[e] | self.covering(e) for e in todo}, self.newcomers, self.verifier
        )
        self.unplaced.update(e for e in missing if not self.covering(e))
        exchange = self.dispatcher.exchange
        for call in calls:
            task = self.loop.create_task(exchange.call(call, self.x, self.dtype, self.deadline))
            self.inflight[task], self.sent_at[task] = call, self.loop.time()
            self.health.get(call.replica.peer_id).inflight_rows += call.rows
        return len(calls)

    async def wait(self) -> set[asyncio.Task]:
        """Until an answer arrives, a call is due for a hedge, or the deadline passes."""
        now = self.loop.time()
        wake = self.deadline
        if self.dispatcher.hedge:
            for task, call in self.inflight.items():
                if task not in self.hedged:
                    wake = min(wake, self.hedge_at(task, call))
        done, _ = await asyncio.wait(self.inflight, timeout=max(wake - now, 0), return_when=asyncio.FIRST_COMPLETED)
        return done

    def settle(self, task: asyncio.Task) -> None:
        call = self.inflight.pop(task)
        health = self.health.get(call.replica.peer_id)
        health.inflight_rows -= call.rows
        error = task.exception()
        if error is None:
            self.on_answer(call, task.result(), health)
        else:
            self.on_failure(call, error)

    def on_answer(self, call: PeerCall, answer: Answer, health: PeerHealth) -> None:
        """The first answer for an expert wins; later ones (hedge duplicates) are ignored."""
        out = answer.out
        health.observe(answer.ms, out.shape[0])
        self.stats.record_rpc(call.replica.peer_id, call.replica.record.endpoint, out.shape[0], answer.ms)
        offset = 0
        for expert, (_, rows) in zip(call.experts, call.segments, strict=True):
            if expert not in self.answers:
                self.answers[expert] = out[offset : offset + rows]
                self.proofs[expert] = answer.proof
            offset += rows

    def on_failure(self, call: PeerCall, error: BaseException) -> None:
        """Ban the peer (unless it was only overloaded, or said it is leaving) and send its
        unanswered experts elsewhere."""
        peer = call.replica.peer_id
        refused = getattr(error, "code", None) == grpc.StatusCode.RESOURCE_EXHAUSTED
        leaving = isinstance(error, RemoteExpertError) and error.not_serving
        if leaving:  # skipped until its DHT record says so too, without a failure streak
            self.health.ban(peer, min(LEAVING_SKIP_S, 2 * self.dispatcher.swarm.refresh_period))
        elif not refused:  # overloaded, not broken: go elsewhere, no ban
            seconds = self.health.fail(peer)
            log.info("peer %s banned for %.0fs, its experts go to other replicas: %s", peer, seconds, error)
        retry = [e for e in call.experts if e not in self.answers]
        for expert in retry:
            self.tried[expert].add(peer)
        # counted whether a hedge already covers the expert or a new call is sent
        self.stats.record_failure(refused or leaving, len(retry), leaving=leaving)
        retry = [e for e in retry if not self.covering(e)]
        if retry:
            self.launch(retry)

    def hedge_slow(self) -> None:
        """A duplicate on another replica for each call past its peer's p95 (once per call)."""
        now = self.loop.time()
        for task, call in list(self.inflight.items()):
            if task in self.hedged or now < self.hedge_at(task, call):
                continue
            self.hedged.add(task)
            todo = [e for e in call.experts if e not in self.answers]
            if todo and self.launch(todo):
                self.stats.record_hedge()

    async def look_again(self) -> None:
        """Nothing left to wait for: look at the DHT once more (rate-limited, shared by concurrent
        calls) in case a replica joined or our view was behind."""
        self.looked_again = True
        try:
            await asyncio.wait_for(
                self.dispatcher.swarm.refresh_if_older(REFRESH_ON_MISS_S), self.deadline - self.loop.time()
            )
        except Exception as e:  # a failed lookup leaves it to the fallback policy
            log.debug("DHT lookup for unplaced experts failed: %r", e)
        todo = sorted(e for e in self.unplaced if e not in self.answers)
        self.unplaced.clear()
        self.launch(todo)

    async def abandon_inflight(self) -> None:
        """Cancel the losers of a hedge, or calls past the deadline; each peer counts as at least
        that slow. A peer that never answered anything is banned (with backoff) when its call
        cost this one time, i.e. it was hedged or ran into the deadline: a peer that accepts
        calls and never answers costs each layer call one hedge delay, once per ban. A hedge
        duplicate that the original call beat cost nothing and says nothing about its peer
        (banning it would keep a new replica untried, and out of reach when it is the last)."""
        now = self.loop.time()
        for task, call in self.inflight.items():
            task.cancel()
            health = self.health.get(call.replica.peer_id)
            health.inflight_rows -= call.rows
            health.outpaced((now - self.sent_at[task]) * 1e3)
            if not health.answered and (task in self.hedged or now >= self.deadline):
                self.health.fail(call.replica.peer_id)
        await asyncio.gather(*self.inflight, return_exceptions=True)

    # ---- helpers --------------------------------------------------------------------------
    def covering(self, expert: int) -> set[str]:
        """Peers computing `expert` right now."""
        return {c.replica.peer_id for c in self.inflight.values() if expert in c.experts}

    def hedge_at(self, task: asyncio.Task, call: PeerCall) -> float:
        """Loop time at which `task` is slow enough for a hedge: its peer's observed p95 after sending."""
        d = self.dispatcher
        delay_ms = self.health.hedge_delay_ms(call.replica.peer_id, d.hedge_default_ms, d.hedge_min_ms)
        return self.sent_at[task] + delay_ms / 1e3
