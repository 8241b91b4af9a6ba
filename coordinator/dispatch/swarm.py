"""A live view of the swarm from the DHT: expert uid -> replicas that serve it.

Refreshed in the background with `latest=True` reads, so a peer's LEFT tombstone or
record expiry removes it within one refresh period. Between refreshes a record counts as
live if it was unexpired at the last refresh: a peer re-announces before its record
expires, and judging our copy by its own expiration would hide healthy peers whenever the
refresh period exceeds the announcement slack. Dead peers meanwhile are hidden by the
dispatcher's health cache (a failed call bans). Malformed records are skipped (and logged
once per peer): a bad peer cannot break the view.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hivemind import DHT
from hivemind.utils import get_dht_time

from protos.endpoints import is_local_host, parse_endpoint
from protos.plumbing.dht import fetch_latest
from protos.records import PeerRecord, model_family, models_key, parse_expert_uid

log = logging.getLogger(__name__)

MAX_WARNED = 4096  # peers remembered as already warned about


@dataclass(frozen=True)
class Replica:
    peer_id: str
    record: PeerRecord
    expiration: float


class SwarmView:
    def __init__(self, dht: DHT, uids: Sequence[str], refresh_period: float = 5.0, local: bool = True) -> None:
        """`local`: the swarm runs on loopback/private addresses, so records may name them; a
        public swarm's view drops such records (a record must not aim us at our own network)."""
        self.dht = dht
        self.uids = list(uids)
        self.refresh_period = refresh_period
        self.local = local
        self.on_refresh: list[Callable[[], None]] = []  # called on the loop after each refresh
        self._replicas: dict[str, list[Replica]] = {}
        self._bad_peers: set[str] = set()
        self.last_refresh = 0.0  # monotonic time of the last successful refresh
        self._refreshed_at = 0.0  # DHT time at which it started
        self._refresh_lock = asyncio.Lock()
        self._rng = random.Random()  # our own: the global generator belongs to the application
        self._task: asyncio.Task | None = None

    def replicas(self, uid: str) -> list[Replica]:
        """Replicas of `uid` that serve now (online, unexpired at the last refresh)."""
        # without a successful refresh for two periods, fall back to the records' own expiry
        cutoff = max(self._refreshed_at, get_dht_time() - 2 * self.refresh_period)
        return [r for r in self._replicas.get(uid, ()) if r.expiration > cutoff and r.record.state.serving]

    def announced(self, uid: str) -> list[Replica]:
        """Every record of `uid` at the last refresh, whatever its state (a LEFT tombstone says who left)."""
        return list(self._replicas.get(uid, ()))

    def snapshot(self) -> dict[str, list[Replica]]:
        return {uid: self.replicas(uid) for uid in self.uids}

    async def models_served(self) -> dict[str, int]:
        """Model ids of this view's family that peers serve now (from the family's index key), with
        how many peers serve each: what to tell a user whose checkpoint nobody serves."""
        family = model_family(parse_expert_uid(self.uids[0])[0])
        key = models_key(family)
        now, peers = get_dht_time(), {}
        for value, expiration in (await fetch_latest(self.dht, [key])).get(key, {}).values():
            try:
                record = PeerRecord.from_dict(value)
            except (ValueError, KeyError, TypeError):
                continue
            if expiration > now and record.state.serving and record.model and model_family(record.model) == family:
                peers.setdefault(record.model, set()).add(record.peer_id)
        return {model: len(ids) for model, ids in sorted(peers.items())}

    async def refresh_if_older(self, age_s: float) -> bool:
        """Refresh now unless the view is younger than `age_s`; concurrent callers share one
        fetch. For the dispatcher when an expert has no replica: a peer may have joined since."""
        if time.monotonic() - self.last_refresh < age_s:
            return False
        async with self._refresh_lock:
            if time.monotonic() - self.last_refresh < age_s:  # another caller just did it
                return True
            await self.refresh()
        return True

    async def refresh(self) -> None:
        started = get_dht_time()
        raw = await fetch_latest(self.dht, self.uids)
        view: dict[str, list[Replica]] = {}
        for uid, subkeys in raw.items():
            replicas = []
            for peer_id, (value, expiration) in subkeys.items():
                try:
                    record = PeerRecord.from_dict(value)
                except (ValueError, KeyError, TypeError) as e:
                    self._warn_once(peer_id, f"ignoring malformed record of peer {peer_id} for {uid}: {e}")
                    continue
                if not self.local and record.reach is None and is_local_host(parse_endpoint(record.endpoint)[0]):
                    self._warn_once(peer_id, f"ignoring peer {record.peer_id}: a local endpoint in a public swarm")
                    continue
                # the DHT's validators checked the owner's signature and the identity's binding
                replicas.append(Replica(record.peer_id, record, expiration))
            view[uid] = replicas
        self._replicas = view  # swapped whole: readers never see half a refresh
        self._refreshed_at = started
        self.last_refresh = time.monotonic()
        for callback in self.on_refresh:
            callback()

    def _warn_once(self, peer_id: object, message: str) -> None:
        if peer_id not in self._bad_peers:
            if len(self._bad_peers) >= MAX_WARNED:  # throwaway identities cannot grow it without bound
                self._bad_peers.clear()
            self._bad_peers.add(peer_id)
            log.warning("%s", message)

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:
                log.warning("swarm refresh failed: %s", e)
            # jitter so many coordinators started together do not refresh in lockstep
            await asyncio.sleep(self.refresh_period * self._rng.uniform(0.9, 1.1))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
