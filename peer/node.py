"""One volunteer node's life, from a PeerConfig: start (experts, DHT node, reachability check,
gRPC server, metrics), announce, re-place (--experts auto), drain and leave.

    node = PeerNode(config)
    await node.run()  # until node.stop() (or SIGINT/SIGTERM with handle_signals=True)

or, step by step: `await node.start()`, then `node.stop()` / `await node.drain()`, and always
`await node.close()`. `serve(config)` is the whole `moe-peer serve` process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING

import torch
from hivemind import DHT

from protos import __version__
from protos.envelope import Identity
from protos.plumbing.dht import joined, start_dht
from protos.plumbing.files import write_json_atomic
from protos.plumbing.reachability import check_reachable, serve_dial_back
from protos.records import PeerRecord, PeerState, models_key
from protos.validation import owner_subkey

from .announce import Announcer
from .auto_placement import AutoPlacement, Pair
from .backends.base import ExpertBackend
from .backends.faults import with_faults
from .backends.load import describe_model, load_backend
from .config import PeerConfig
from .host import release_freed_memory, split_cpus
from .metrics import PeerMetrics
from .relay import RelayedService, serve_relayed
from .selfbench import cached_throughput
from .service.server import start_server
from .service.servicer import ExpertServicer
from .service.settings import Access
from .sessions import read_allowlist
from .startup import StartupClock

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("moe-peer")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# each DHT write while leaving waits at most this long: a DHT child killed with the process
# group (`timeout`, `kill -- -PGID`, a supervisor) must not hold the leave forever
LEAVE_DHT_STEP_S = 3.0


class PeerNode(AutoPlacement):
    def __init__(self, config: PeerConfig, *, handle_signals: bool = False) -> None:
        self.config = config
        self.handle_signals = handle_signals  # the process's node: SIGINT/SIGTERM drain and leave
        self.impairment = config.impairment()  # one stream of draws across re-placements
        self.spec = config.experts  # what is hosted, in the --experts grammar (auto: once placed)
        self.device = torch.device("cpu")
        self.identity: Identity | None = None
        self.owner = b""  # our subkey under every expert uid in the DHT
        self.dht: DHT | None = None
        self.servicer: ExpertServicer | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0  # the bound gRPC port
        self.announcer: Announcer | None = None
        self.metrics: PeerMetrics | None = None
        self.metrics_port: int | None = None
        self.endpoint = ""
        self.relayed: RelayedService | None = None  # serving through relays (--relay)
        self.throughput = 0.0
        # --experts auto: the model's experts, one's size in bytes, and what this node hosts
        self.model_id = ""
        self.pairs: list[Pair] = []
        self.expert_bytes = 0
        self.hosted: list[Pair] = []
        self._stop = asyncio.Event()
        self._signals = False  # stop handlers installed on the loop
        self._task: asyncio.Task | None = None  # run(): a second stop signal cancels it
        self._forced = False
        self.clock = StartupClock()

    @property
    def peer_id(self) -> str:
        return self.identity.fingerprint

    async def run(self) -> None:
        """Start, serve until stopped, then drain and leave."""
        self._task = asyncio.current_task()
        try:
            await self.start()
            await self.serve_until_stopped()
            await self.drain()
        except asyncio.CancelledError:
            if not self._forced:
                raise
        finally:
            await self.close()

    def stop(self) -> None:
        """Ask a running node to drain and leave."""
        self._stop.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        """The first SIGINT/SIGTERM drains and leaves; a second one leaves at once."""
        if not self._stop.is_set():
            log.info("%s: draining (a second signal stops at once)", sig.name)
            self.stop()
        elif self._task is not None and not self._task.done():
            log.warning("%s again: stopping now, without draining", sig.name)
            self._forced = True
            self._task.cancel()

    async def start(self) -> None:
        """Load the experts, join the DHT, serve gRPC and announce: ONLINE once it returns."""
        cfg, clock = self.config, self.clock
        access = self._access()  # file and value errors surface before anything starts
        self.identity = access.identity
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._join()
        if cfg.auto_placement:
            self.model_id, self.pairs, self.expert_bytes = describe_model(cfg)
            self._joined()
            clock.mark("dht")
            experts = await self._place()
            clock.mark("experts")
        else:
            experts = self._load(self.spec)  # a configuration error stops the starting DHT node at once
            clock.mark("experts")
            self._joined()
            clock.mark("dht")
        release_freed_memory()
        self.throughput = cached_throughput(experts, remeasure=cfg.remeasure)
        clock.mark("throughput")
        await self._open(experts, access)
        clock.mark("server")
        if cfg.key_file is None:  # said once the start can no longer fail on configuration
            log.info("using a fresh identity (pass --key-file to keep one across restarts)")
        await self._go_online()

    def _access(self) -> Access:
        cfg = self.config
        identity = Identity.load_or_create(cfg.key_file) if cfg.key_file is not None else Identity.generate()
        limiter = cfg.rate_limiter()
        allow = read_allowlist(cfg.allow_clients) if cfg.allow_clients is not None else None
        return Access(
            identity,
            allow_plaintext=cfg.allow_plaintext,
            allow_clients=allow,
            rate_limiter=limiter,
            address_limiter=cfg.address_limiter(),
        )

    def _load(self, spec: str) -> ExpertBackend:
        backend = load_backend(self.config, spec, self.device)
        return with_faults(backend, self.impairment, self.config.sim_corrupt)

    def _join(self) -> None:
        """Fork the DHT node: it starts and joins the swarm while the experts load (`_joined`)."""
        rsa = self.identity.rsa_key()
        cfg = self.config
        # the DHT child ignores SIGINT (hivemind), and its p2pd inherits that: a terminal's Ctrl-C
        # to the process group leaves them up until we have drained and withdrawn our records
        self.dht = start_dht(cfg.initial_peers, host=cfg.host, port=cfg.dht_port, rsa_key=rsa, wait=False)
        self.owner = owner_subkey(rsa)

    def _joined(self) -> None:
        cfg = self.config
        joined(self.dht, cfg.initial_peers, cfg.host, cfg.dht_port)

    async def _open(self, experts: ExpertBackend, access: Access) -> None:
        """Metrics, the servicer and its gRPC server, and the announcer (not announcing yet)."""
        cfg = self.config
        if cfg.metrics_port is not None:
            self.metrics = PeerMetrics()
            self.metrics_port = self.metrics.serve(cfg.metrics_port, cfg.metrics_host)
            log.info("metrics at http://%s:%d/metrics", cfg.metrics_host, self.metrics_port)
        self.servicer = ExpertServicer(
            experts,
            peer_id=self.peer_id,
            limits=cfg.limits(),
            access=access,
            batching=cfg.batching(),
            metrics=self.metrics,
        )
        self.server, self.port = await start_server(self.servicer, cfg.host, cfg.port, cfg.max_message_bytes)
        self.endpoint = f"{cfg.announce_host or cfg.host}:{cfg.announce_port or self.port}"
        ix = [models_key(experts.model_id)]  # lets coordinators of other weights name this model
        self.announcer = Announcer(self.dht, experts.uids, self.record, self.owner, cfg.announce_period, index_keys=ix)
        if self.handle_signals:
            loop = asyncio.get_running_loop()
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)
            self._signals = True

    async def _go_online(self) -> None:
        cfg, experts = self.config, self.servicer.experts
        serve_dial_back(self.dht)  # answer other peers' reachability checks
        if cfg.initial_peers and not cfg.skip_reachability_check:
            await self.require_reachable()
        self.servicer.state = PeerState.ONLINE
        await self.announcer.announce()
        self.announcer.start()
        self.clock.mark("online")
        log.info(
            "serving %d experts of %s at %s (peer %s, %s, %.0f tokens/s/expert), %s",
            len(experts.uids),
            experts.model_id,
            self.endpoint,
            self.peer_id,
            self.device,
            self.throughput,
            self.clock.summary(),
        )
        if not cfg.initial_peers:  # alone, by choice or by mistake: say so, and how others join
            maddrs = " ".join(str(m) for m in self.dht.get_visible_maddrs())
            log.warning("no --initial-peers: a swarm of its own; others join it with --initial-peers %s", maddrs)
        if cfg.ready_file:
            ready = {
                "endpoint": self.endpoint,
                "peer_id": self.peer_id,
                "pid": os.getpid(),
                "model_id": experts.model_id,
                "experts": experts.uids,
                "metrics_port": self.metrics_port,
                "startup_s": self.clock.as_dict(),
            }
            write_json_atomic(cfg.ready_file, ready)

    def record(self) -> PeerRecord:
        """This peer's announcement as it stands now."""
        return PeerRecord.signed(
            self.identity,
            self.owner,
            endpoint=self.endpoint,
            state=self.servicer.state,
            load=self.servicer.load,
            throughput=self.throughput,
            device=str(self.device),
            version=__version__,
            reach=self.relayed.reach if self.relayed is not None else None,
            model=self.servicer.experts.model_id,
        )

    async def require_reachable(self) -> None:
        """Refuse to announce an address other nodes cannot dial, saying what to change."""
        cfg = self.config
        if cfg.relay == "always":
            self.relayed = await serve_relayed(self.servicer, cfg.initial_peers, "--relay always")
            return
        ok, detail = await check_reachable(self.dht, list(cfg.initial_peers), self.endpoint)
        if ok is False and cfg.relay == "auto":
            why = f"not directly reachable at {self.endpoint} ({detail})"
            self.relayed = await serve_relayed(self.servicer, cfg.initial_peers, why)
            return
        if ok is None:
            log.warning("could not verify that %s is reachable (%s); announcing anyway", self.endpoint, detail)
            return
        if not ok:
            hint = (
                "bind a public interface with --host 0.0.0.0 and announce --announce-host <this machine's address>"
                if cfg.host.startswith("127.")
                else f"forward TCP port {cfg.announce_port or self.port} to this machine (router/firewall) and pass "
                f"--announce-host <your public address> (and --announce-port if the forwarded port differs)"
            )
            raise ConnectionError(
                f"other nodes cannot reach this peer at {self.endpoint} ({detail}); announcing it would send "
                f"coordinators to a dead address. To fix: {hint}; or serve through the swarm's relays "
                "(--relay auto, slower). (--skip-reachability-check announces anyway.)"
            )

    async def serve_until_stopped(self) -> None:
        """Serve (re-placing now and then with --experts auto) until stop()."""
        if self.config.auto_placement and self.config.placement_check > 0:
            mover = asyncio.create_task(self.keep_placement())
            stopped = asyncio.create_task(self._stop.wait())
            await asyncio.wait([mover, stopped], return_when=asyncio.FIRST_COMPLETED)
            mover.cancel()
            await asyncio.gather(mover, return_exceptions=True)
        await self._stop.wait()

    async def drain(self) -> None:
        """Leave gracefully: DRAINING (readers stop choosing us), in-flight work finishes within
        the drain timeout, then LEFT tombstones replace our records."""
        timeout = self.config.drain_timeout
        log.info(
            "leaving: finishing %d in-flight rows (up to %.0fs), then withdrawing our records",
            self.servicer.load,
            timeout,
        )
        self.servicer.state = PeerState.DRAINING
        await self.announcer.stop_refreshing()
        # readers stop choosing us while in-flight work finishes
        await self._leave_step(self.announcer.announce(), "announce that we are draining")
        deadline = time.monotonic() + timeout
        await self.server.stop(grace=timeout)
        while self.servicer.load and time.monotonic() < deadline:  # relayed requests still in flight
            await asyncio.sleep(0.05)
        if await self._leave_step(self.announcer.withdraw(), "withdraw our records"):
            log.info("withdrawn from the DHT; served %d requests", self.servicer.served_requests)

    async def _leave_step(self, write: Coroutine[None, None, None], what: str) -> bool:
        """One DHT write while leaving, bounded: whatever state the DHT child is in, leaving
        finishes within the drain timeout plus a few seconds."""
        expire = 3 * self.config.announce_period
        if self.dht is None or not self.dht.is_alive():
            write.close()
            log.warning("the DHT node is gone: cannot %s; our records expire within %.0fs", what, expire)
            return False
        try:
            await asyncio.wait_for(write, LEAVE_DHT_STEP_S)
            return True
        except Exception as e:  # a dead daemon, a timeout: leave anyway
            log.warning("could not %s (%s); our records expire within %.0fs", what, type(e).__name__, expire)
            return False

    async def close(self) -> None:
        """Stop whatever start() got to: server, compute threads, DHT node."""
        if self._signals:
            loop = asyncio.get_running_loop()
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            self._signals = False
        if self.server is not None:
            await self.server.stop(grace=None)
        if self.relayed is not None:
            await self.relayed.close()
        if self.servicer is not None:
            self.servicer.close()
        if self.dht is not None:  # one still starting reads the request once up (hivemind terminates it after 3 s)
            self.dht.shutdown()


def serve(config: PeerConfig) -> None:
    """The `moe-peer serve` process: torch threads and CPU pinning for the whole process, then
    the node until SIGINT/SIGTERM."""
    import uvloop

    if config.threads:
        torch.set_num_threads(config.threads)
    if config.compute_cpus is not None:
        split_cpus(config.compute_cpus)
        if not config.threads:  # one torch thread per compute CPU, not per CPU of the host
            torch.set_num_threads(len(config.compute_cpus))
    uvloop.run(PeerNode(config, handle_signals=True).run())
