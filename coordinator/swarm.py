"""A live view of the swarm from the DHT: expert uid -> replicas that serve it.

Refreshed in the background with `latest=True` reads, so a peer's LEFT tombstone or
record expiry removes it within one refresh period. Malformed records are skipped (and
logged once per peer): a bad peer cannot break the view.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hivemind import DHT
from hivemind.utils import get_dht_time

from protos.records import PeerRecord, fetch_latest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replica:
    peer_id: str
    record: PeerRecord
    expiration: float


class SwarmView:
    def __init__(self, dht: DHT, uids: Sequence[str], refresh_period: float = 5.0) -> None:
        self.dht = dht
        self.uids = list(uids)
        self.refresh_period = refresh_period
        self._replicas: dict[str, list[Replica]] = {}
        self._bad_peers: set[str] = set()
        self.last_refresh = 0.0
        self._task: asyncio.Task | None = None

    def replicas(self, uid: str) -> list[Replica]:
        """Replicas of `uid` that serve now (online, not expired)."""
        now = get_dht_time()
        return [r for r in self._replicas.get(uid, ()) if r.expiration > now and r.record.state.serving]

    def snapshot(self) -> dict[str, list[Replica]]:
        return {uid: self.replicas(uid) for uid in self.uids}

    async def refresh(self) -> None:
        raw = await fetch_latest(self.dht, self.uids)
        view: dict[str, list[Replica]] = {}
        for uid, subkeys in raw.items():
            replicas = []
            for peer_id, (value, expiration) in subkeys.items():
                try:
                    record = PeerRecord.from_dict(value)
                except (ValueError, KeyError, TypeError) as e:
                    if peer_id not in self._bad_peers:
                        self._bad_peers.add(peer_id)
                        log.warning("ignoring malformed record of peer %s for %s: %s", peer_id, uid, e)
                    continue
                replicas.append(Replica(str(peer_id), record, expiration))
            view[uid] = replicas
        self._replicas = view  # swapped whole: readers never see half a refresh
        self.last_refresh = time.monotonic()

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:
                log.warning("swarm refresh failed: %s", e)
            # jitter so many coordinators started together do not refresh in lockstep
            await asyncio.sleep(self.refresh_period * random.uniform(0.9, 1.1))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
