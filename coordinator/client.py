"""SwarmClient: the coordinator's connection to a swarm (DHT node, swarm view, channels, dispatcher)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from coordinator.dispatch.dispatcher import Dispatcher, DispatchResult, ScoresFn
from coordinator.dispatch.loop import LoopThread
from coordinator.dispatch.probe import Prober
from coordinator.dispatch.referee import Referee
from coordinator.dispatch.spot import DEFAULT_SPOT_CHECK
from coordinator.dispatch.swarm import SwarmView
from coordinator.dispatch.transport import Channels, Sessions
from coordinator.dispatch.trust import TrustStore
from protos.endpoints import is_local_host
from protos.envelope import Identity
from protos.limits import DEFAULT_MAX_MESSAGE_BYTES
from protos.plumbing.dht import start_dht


def swarm_is_local(initial_peers: Sequence[str]) -> bool:
    """Whether every initial peer is a loopback/private address (/ip4/10.0.0.5/tcp/...): a swarm
    on one machine or a LAN, whose records may name such addresses too."""
    hosts = []
    for maddr in initial_peers:
        parts = maddr.split("/")
        hosts += [parts[i + 1] for i, p in enumerate(parts[:-1]) if p in ("ip4", "ip6", "dns", "dns4", "dns6")]
    return bool(hosts) and all(is_local_host(h) for h in hosts)


class SwarmClient:
    def __init__(
        self,
        initial_peers: Sequence[str],
        uids: Sequence[str],
        *,
        refresh_period: float = 5.0,
        timeout: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        host: str = "127.0.0.1",
        fallback: str = "error",
        hedge: bool = True,
        identity: Identity | None = None,
        secure: bool = True,
        spot_check: float | None = None,
        metrics_port: int | None = None,
        local: bool | None = None,
        trust_store: Path | None = None,
        referee: Referee | None = None,
    ) -> None:
        """`spot_check`: base fraction of answers verified on another replica (default:
        DEFAULT_SPOT_CHECK in a public swarm, 0 in a local one); `local`: whether records may
        name loopback/private addresses (default: whether the initial peers are such
        addresses); `trust_store`: a file keeping bans and verified histories across runs;
        `referee`: recomputes the experts this coordinator holds, to settle disputes."""
        self.local = swarm_is_local(initial_peers) if local is None else local
        if spot_check is None:
            spot_check = 0.0 if self.local else DEFAULT_SPOT_CHECK
        # client_mode: a coordinator reads the DHT but stores nobody's records; it validates
        # what it reads with the same validators as every node
        self.dht = start_dht(initial_peers, host=host, client_mode=True)
        self.identity = identity or Identity.generate()
        self.io = LoopThread()
        self.swarm = SwarmView(self.dht, uids, refresh_period, local=self.local)
        self.channels = Channels(max_message_bytes)
        sessions = Sessions(self.identity, self.channels) if secure else None
        self.dispatcher = Dispatcher(
            self.swarm,
            self.channels,
            timeout,
            fallback=fallback,
            hedge=hedge,
            sessions=sessions,
            spot_check=spot_check,
            trust=TrustStore(trust_store),
            referee=referee,
            local=self.local,
        )
        self.prober = Prober(self.swarm, self.dispatcher.health, self.channels, sessions)
        self.metrics_port = None
        if metrics_port is not None:
            from coordinator.ops.metrics import serve_metrics

            self.metrics_port = serve_metrics(self.dispatcher.stats, metrics_port)
        self.io.run(self._start())

    async def _start(self) -> None:
        self.swarm.on_refresh.append(self.prober.probe_new)
        await self.swarm.refresh()
        self.swarm.start()

    def wait_for_experts(
        self,
        uids: Sequence[str] | None = None,
        timeout: float = 30.0,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> None:
        """Block until every uid has a live replica that is not known to be unreachable (peers
        announce a moment after they start; probes tell the reachable ones within a few seconds).
        `progress(covered, total, seconds_left)` hears of the coverage first and whenever it changes."""
        uids = list(uids or self.swarm.uids)
        deadline = time.monotonic() + timeout
        seen = -1
        while True:
            missing = [u for u in uids if not self.dispatcher.planner.usable(u)]
            if progress is not None and len(missing) != seen:
                seen = len(missing)
                progress(len(uids) - seen, len(uids), max(deadline - time.monotonic(), 0.0))
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} experts have no live replica after {timeout}s, e.g. {missing[0]}")
            self.io.run(self.swarm.refresh())
            time.sleep(0.2)

    def dispatch(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        uids: list[str],
        dtype: torch.dtype,
        scores: ScoresFn = None,
    ) -> DispatchResult:
        return self.io.run(self.dispatcher.dispatch(x, experts, uids, dtype, scores))

    def close(self) -> None:
        async def _stop() -> None:
            await self.swarm.stop()
            await self.prober.stop()
            self.dispatcher.trust.save()
            await self.channels.close()

        try:
            self.io.run(asyncio.wait_for(_stop(), 5))
        finally:
            self.io.close()
            self.dht.shutdown()

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
