"""Probing replicas a coordinator has not talked to, before any real work goes to them.

Anyone can announce records: a tarpit that accepts connections and never answers, a closed
port, a key it does not hold. After each refresh of the swarm view, every replica not probed
yet (and not banned) gets one cheap call in the background: opening a sealed session (which
also proves it holds the X25519 key it announced), or `Info` for plaintext clients. At most
MAX_CONCURRENT probes run at once, each bounded by PROBE_TIMEOUT_S. A replica that fails is
banned with the usual backoff and probed again once the ban ends, so one bad identity costs
at most one bounded background probe per ban period, none of a layer call's time.
"""

from __future__ import annotations

import asyncio
import logging

from coordinator.dispatch.health import HealthCache
from coordinator.dispatch.swarm import Replica, SwarmView
from coordinator.dispatch.transport import Channels, Sessions
from protos import expert_service_pb2 as pb

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
MAX_CONCURRENT = 32


class Prober:
    def __init__(self, swarm: SwarmView, health: HealthCache, channels: Channels, sessions: Sessions | None) -> None:
        self.swarm = swarm
        self.health = health
        self.channels = channels
        self.sessions = sessions
        self._running: dict[str, asyncio.Task] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)

    def probe_new(self) -> None:
        """Start a probe of every replica in the view that has none running, no verdict yet (or
        a failed one whose ban has ended), and no ban now (loop thread)."""
        loop = asyncio.get_running_loop()
        for replicas in self.swarm.snapshot().values():
            for r in replicas:
                health = self.health.get(r.peer_id)
                if r.peer_id in self._running or health.reachable is True or self.health.banned(r.peer_id):
                    continue
                task = loop.create_task(self._probe(r))
                self._running[r.peer_id] = task
                task.add_done_callback(lambda _, peer=r.peer_id: self._running.pop(peer, None))

    async def _probe(self, replica: Replica) -> None:
        async with self._slots:
            try:
                await asyncio.wait_for(self._call(replica), PROBE_TIMEOUT_S)
            except Exception as e:  # any failure: unreachable for now
                health = self.health.get(replica.peer_id)
                health.reachable = False
                seconds = self.health.fail(replica.peer_id)
                log.info(
                    "peer %s at %s did not answer a probe (%r); banned %.0fs",
                    replica.peer_id,
                    replica.record.endpoint,
                    e,
                    seconds,
                )
            else:
                self.health.get(replica.peer_id).reachable = True

    async def _call(self, replica: Replica) -> None:
        record = replica.record
        if self.sessions is not None:
            await self.sessions.get(record.route, record.kx, PROBE_TIMEOUT_S, record.reach)
        else:
            await self.channels.stub(record.route, record.reach).Info(pb.InfoRequest(), timeout=PROBE_TIMEOUT_S)

    async def stop(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
