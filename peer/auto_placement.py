"""--experts auto: the first placement (the least-covered experts that fit the memory budget),
then moving to a better set while serving, without failing a request."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from hivemind.utils import get_dht_time

from protos.expert_spec import format_expert_spec
from protos.plumbing.dht import fetch_latest
from protos.records import PeerState, count_serving, expert_uid, parse_expert_uid

from .host import release_freed_memory
from .placement import better_placement, choose_experts

if TYPE_CHECKING:
    from hivemind import DHT

    from .announce import Announcer
    from .backends.base import ExpertBackend
    from .config import PeerConfig
    from .service.servicer import ExpertServicer

log = logging.getLogger("moe-peer")
Pair = tuple[int, int]  # (layer, expert)


class AutoPlacement:
    """PeerNode's --experts auto part (a mixin: it shares the node's DHT, servicer and announcer)."""

    config: PeerConfig
    dht: DHT | None
    owner: bytes
    servicer: ExpertServicer | None
    announcer: Announcer | None
    spec: str
    model_id: str  # the model's id, its every (layer, expert), one expert's bytes, and what is hosted
    pairs: list[Pair]
    expert_bytes: int
    hosted: list[Pair]

    def _load(self, spec: str) -> ExpertBackend:
        raise NotImplementedError

    async def coverage(self) -> dict[Pair, int]:
        """Serving replicas per expert of the model, not counting this peer."""
        uids = {pair: expert_uid(self.model_id, *pair) for pair in self.pairs}
        raw = await fetch_latest(self.dht, list(uids.values()))
        others = {uid: {sk: v for sk, v in subs.items() if sk != self.owner} for uid, subs in raw.items()}
        counts = count_serving(others, get_dht_time())
        return {pair: counts.get(uid, 0) for pair, uid in uids.items()}

    async def _place(self) -> ExpertBackend:
        """The first placement: the least-covered experts that fit the budget."""
        await asyncio.sleep(random.uniform(0, self.config.placement_delay))
        replicas = await self.coverage()
        chosen = choose_experts(self.pairs, replicas, self.expert_bytes, self.config.budget_bytes)
        self.spec = format_expert_spec(chosen)
        log.info("auto placement: hosting %s (coverage before: %s)", self.spec, sorted(set(replicas.values())))
        experts = self._load(self.spec)
        self.hosted = sorted(parse_expert_uid(u)[1:] for u in experts.uids)
        return experts

    async def keep_placement(self) -> None:
        """Every placement_check seconds: move to a better set when two checks in a row find one
        (hysteresis), draining first so no request fails."""
        streak = 0
        while True:
            await asyncio.sleep(self.config.placement_check * random.uniform(0.8, 1.2))  # peers don't move in step
            try:
                others = await self.coverage()
            except Exception as e:
                log.warning("placement check could not read the DHT: %s", e)
                continue
            proposal = better_placement(self.pairs, others, self.hosted, self.expert_bytes, self.config.budget_bytes)
            streak = streak + 1 if proposal else 0
            if streak >= 2:
                streak = 0
                await self.move_to(proposal)

    async def move_to(self, proposal: list[Pair]) -> None:
        """Host `proposal` instead: drain, load, withdraw the retired experts, announce again."""
        servicer, announcer = self.servicer, self.announcer
        before, after = format_expert_spec(self.hosted), format_expert_spec(proposal)
        log.info("re-placing: %s -> %s (weakest coverage improves)", before, after)
        servicer.state = PeerState.DRAINING
        await announcer.announce()  # coordinators stop choosing us; in-flight work finishes
        deadline = time.monotonic() + self.config.drain_timeout
        while servicer.load and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.spec = after
        experts = await asyncio.to_thread(self._load, self.spec)
        release_freed_memory()
        retired = sorted(set(announcer.uids) - set(experts.uids))
        servicer.replace_experts(experts)
        announcer.uids = list(experts.uids)
        await announcer.withdraw(retired)
        servicer.state = PeerState.ONLINE
        await announcer.announce()
        self.hosted = proposal
        log.info("now hosting %s", self.spec)
