"""Periodic DHT announcements of this peer's experts, and withdrawal on leave.

Each expert uid is a DHT dictionary key; this peer writes only its own subkey (its RSA
owner marker, enforced by every node's validators: protos/validation.py). Records expire
after `ttl_periods` announcement periods, so a crashed peer vanishes by itself; a leaving
peer writes a LEFT tombstone that outlives its last record (the DHT keeps the value with
the latest expiration), so readers drop it at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from protos.records import PeerRecord, PeerState

log = logging.getLogger(__name__)


async def _store_all(
    dht: DHT, node: DHTNode, keys: Sequence[str], subkey: bytes, value: dict, expiration: float
) -> dict[str, bool]:
    # runs inside the DHT process: one store_many instead of a round trip per expert
    return await node.store_many(list(keys), [value] * len(keys), expiration, subkeys=[subkey] * len(keys))


class Announcer:
    def __init__(
        self,
        dht: DHT,
        uids: Sequence[str],
        record: Callable[[], PeerRecord],
        owner: bytes,
        period: float = 10.0,
        ttl_periods: float = 3.0,
        index_keys: Sequence[str] = (),
    ) -> None:
        self.dht = dht
        self.uids = list(uids)
        self.index_keys = list(index_keys)  # written with every full announcement, besides the experts
        self.record = record
        self.period = period
        self.ttl = period * ttl_periods
        self.subkey = owner  # our RSA owner marker: only our signed writes land under it
        self._last_expiration = 0.0
        self._task: asyncio.Task | None = None

    async def announce(
        self, record: PeerRecord | None = None, expiration: float | None = None, uids: Sequence[str] | None = None
    ) -> bool:
        record = record or self.record()
        expiration = expiration or get_dht_time() + self.ttl
        expiration = max(expiration, self._last_expiration + 1e-3)  # each write must supersede the last
        coro = functools.partial(
            _store_all,
            keys=[*self.uids, *self.index_keys] if uids is None else list(uids),
            subkey=self.subkey,
            value=record.to_dict(),
            expiration=expiration,
        )
        results = await self.dht.run_coroutine(coro, return_future=True)
        self._last_expiration = expiration
        failed = [k for k, ok in results.items() if not ok]
        if failed:
            log.warning("DHT store failed for %d of %d experts", len(failed), len(results))
        return not failed

    async def _loop(self) -> None:
        while True:
            try:
                await self.announce()
            except Exception as e:  # the DHT can be briefly unreachable: try again next period
                log.warning("announcement failed: %s", e)
            await asyncio.sleep(self.period)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop_refreshing(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def withdraw(self, uids: Sequence[str] | None = None) -> None:
        """Replace this peer's records (of `uids`, default all: then refreshing stops) with LEFT
        tombstones that outlive every earlier record."""
        if uids is None:
            await self.stop_refreshing()
        tombstone = dataclasses.replace(self.record(), state=PeerState.LEFT, load=0)
        expiration = max(get_dht_time() + self.ttl, self._last_expiration + 1)
        await self.announce(tombstone, expiration=expiration, uids=uids)
