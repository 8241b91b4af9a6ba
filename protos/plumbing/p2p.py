"""libp2p nodes for relayed expert calls (hivemind's P2P, one p2pd daemon each).

- A relayed peer holds reservations at static relays (the swarm's bootstrap nodes): with
  `relayDiscovery` off, the daemon reserves a slot at once instead of searching the
  libp2p DHT for relay candidates for minutes.
- A relay (bootstrap) node serves circuit relay v2 with explicit limits (RelayLimits); its
  reachability is forced public, or the relay service would wait for AutoNAT to confirm it.
- A coordinator's node only dials (through relays or directly).

Each daemon keeps hivemind's idle timeout: it exits once the process that started it is gone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .lifeline import daemons_bound_here

if TYPE_CHECKING:
    from hivemind.p2p import P2P


@dataclass(frozen=True)
class RelayLimits:
    """What one relay node spends on relayed peers (the daemon's relayService flags)."""

    max_reservations: int = 128  # relayed peers holding a slot here
    max_circuits: int = 16  # open relayed connections per relayed peer
    data_bytes: int = 1 << 30  # bytes relayed per connection and direction before it is reset
    duration_s: int = 3600  # a relayed connection's lifetime before it is reset
    buffer_bytes: int = 1 << 20  # per relayed connection and direction

    def daemon_args(self) -> dict[str, Any]:
        return {
            "relayService": True,
            "relayMaxReservations": self.max_reservations,
            "relayMaxCircuits": self.max_circuits,
            "relayDataLimit": self.data_bytes,
            "relayTimeLimit": f"{self.duration_s}s",
            "relayBufferSize": self.buffer_bytes,
        }


_extra_args: dict[str, Any] = {}  # added to every p2pd this process starts (see relay_service)


def _patched_args(original: Any) -> Any:
    def make(*args: Any, **kwargs: Any) -> list[str]:
        if kwargs.get("autoRelay"):
            kwargs["relayDiscovery"] = False  # static relays only: reserve at once
        kwargs.update(_extra_args)
        return original(*args, **kwargs)

    return make


_installed = False


def _install() -> None:
    """hivemind starts p2pd with a fixed set of flags; this adds ours to every daemon started
    from this process (and from DHT children forked after it)."""
    global _installed
    if _installed:
        return
    from hivemind.p2p import P2P

    P2P._make_process_args = staticmethod(_patched_args(P2P._make_process_args))
    _installed = True


@contextlib.contextmanager
def relay_service(limits: RelayLimits | None) -> Iterator[None]:
    """Daemons started inside this block serve as relays within `limits` (None: they don't)."""
    _install()
    _extra_args.clear()
    _extra_args.update(limits.daemon_args() if limits is not None else {"relayService": False})
    try:
        yield
    finally:
        _extra_args.clear()


async def start_relayed_node(relays: Sequence[str]) -> P2P:
    """A node behind NAT: reserves slots at `relays` (multiaddrs ending /p2p/<id>) and serves
    through them; it relays for nobody. AutoNAT and with it hole punching are off: a relayed
    peer stays relayed (what its record says), rather than sometimes upgrading to a direct
    connection that the swarm's view and benchmarks would not see."""
    from hivemind.p2p import P2P

    _install()
    with relay_service(None), daemons_bound_here():
        return await P2P.create(
            initial_peers=list(relays),
            trusted_relays=list(relays),
            host_maddrs=[],
            no_listen=True,  # reached only through its relays: it has no address worth dialling
            use_relay=True,
            use_auto_relay=True,
            force_reachability="private",
            dht_mode="client",
            auto_nat=False,
        )


async def start_dialing_node(host: str = "127.0.0.1") -> P2P:
    """A coordinator's node: dials relayed peers through their relays."""
    from hivemind.p2p import P2P

    _install()
    with relay_service(None), daemons_bound_here():
        return await P2P.create(host_maddrs=[f"/ip4/{host}/tcp/0"], use_relay=True, dht_mode="client", auto_nat=False)
