"""Dial-back reachability check over the DHT's libp2p connections.

Every moe-swarm DHT node (bootstrap and peers) answers "can you reach host:port?" by opening
a TCP connection to it; a starting peer asks the nodes it joined through before announcing
its endpoint, so a NATed or mis-addressed peer is told what to fix instead of publishing a
dead address. Handlers run inside the DHT process (hivemind's `run_coroutine`).

The dial-back is not a port scanner for hire: a node dials only the address it sees the
requester's libp2p connection come from (a host name must resolve to it; a requester on this
very machine may name any address of it: multi-homed hosts, local swarms), DIALS_PER_S per
requesting address (bursts of DIAL_BURST) and DIAL_CONCURRENCY at once, and it answers
yes or no with one of a few fixed reasons, never an error text of its own.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from protos import expert_service_pb2 as pb

if TYPE_CHECKING:
    from hivemind import DHT
    from hivemind.dht.node import DHTNode

HANDLER = "moe_swarm.v1.reachability"
DIAL_TIMEOUT_S = 3.0
DIALS_PER_S, DIAL_BURST = 1.0, 4.0  # per requesting address
DIAL_CONCURRENCY = 8  # dials in progress on one node, all requesters together
MAX_TRACKED = 4096  # requesting addresses whose budget is remembered
BUSY_RETRIES = 30  # a starting peer told BUSY asks again, about once a second
NOT_YOURS = "this node dials only the address it sees you at"
BUSY = "too many reachability checks; retry later"
MALFORMED = "malformed endpoint"
CLOSED = "no connection"
_buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # requesting address -> (tokens, at)
_dials = asyncio.Semaphore(DIAL_CONCURRENCY)


async def _observed_host(p2p: object, peer_id: object) -> str | None:
    """The IP address the requester's connection to this node comes from."""
    for info in await p2p.list_peers():  # the daemon's connections, with their remote addresses
        if info.peer_id == peer_id:
            for addr in info.addrs:
                parts = str(addr).split("/")
                if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
                    return parts[2]
    return None


async def _resolve(host: str, observed: str) -> str | None:
    """The address to dial for `host`: itself when it is the requester's, else the first of its
    resolved addresses that is; None when none is."""
    try:
        return host if _same_host(host, observed) else None
    except ValueError:  # a host name: it must resolve to one of the requester's addresses
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError:
            return None
        return next((i[4][0] for i in infos if _same_host(i[4][0], observed)), None)


def _is_local(ip: str) -> bool:
    """Whether `ip` is an address of this machine (one can bind to it)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
        return True
    except (OSError, ValueError):
        return False


def _same_host(ip: str, observed: str) -> bool:
    """`ip` is the requester's: its observed address, or, for a requester on this very machine
    (a multi-homed host, a local swarm), another address of this machine."""
    return ipaddress.ip_address(ip) == ipaddress.ip_address(observed) or (_is_local(observed) and _is_local(ip))


def _other_ip(host: str, observed: str) -> bool:
    try:
        return not _same_host(host, observed)
    except ValueError:
        return False  # a host name: resolved once the rate allows


def _may_dial(observed: str) -> bool:
    """A token bucket per requesting address: DIALS_PER_S, bursts of DIAL_BURST (several peers
    behind one address start at once)."""
    now = time.monotonic()
    tokens, at = _buckets.pop(observed, (DIAL_BURST, now))
    tokens = min(DIAL_BURST, tokens + (now - at) * DIALS_PER_S)
    ok = tokens >= 1
    _buckets[observed] = (tokens - 1 if ok else tokens, now)
    while len(_buckets) > MAX_TRACKED:
        _buckets.popitem(last=False)
    return ok


async def _dial(p2p: object, request: pb.ReachabilityRequest, context: object) -> pb.ReachabilityReply:
    host, _, port = request.endpoint.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return pb.ReachabilityReply(reachable=False, detail=MALFORMED)
    if _dials.locked():
        return pb.ReachabilityReply(reachable=False, detail=BUSY)
    async with _dials:
        observed = await _observed_host(p2p, context.remote_id)
        if observed is None or _other_ip(host, observed):  # refused without cost: no rate charged
            return pb.ReachabilityReply(reachable=False, detail=NOT_YOURS)
        if not _may_dial(observed):
            return pb.ReachabilityReply(reachable=False, detail=BUSY)
        if (target := await _resolve(host, observed)) is None:
            return pb.ReachabilityReply(reachable=False, detail=NOT_YOURS)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(target, int(port)), DIAL_TIMEOUT_S)
        except (OSError, TimeoutError):
            return pb.ReachabilityReply(reachable=False, detail=CLOSED)
        writer.close()
        return pb.ReachabilityReply(reachable=True)


async def _register(dht: DHT, node: DHTNode) -> None:
    p2p = node.protocol.p2p
    await p2p.add_protobuf_handler(HANDLER, functools.partial(_dial, p2p), pb.ReachabilityRequest)


def serve_dial_back(dht: DHT) -> None:
    """Make this node answer reachability checks."""
    dht.run_coroutine(_register)


async def _ask(dht: DHT, node: DHTNode, peer_id: str, endpoint: str) -> tuple[bool, str]:
    from hivemind.p2p import PeerID

    reply = await asyncio.wait_for(
        node.protocol.p2p.call_protobuf_handler(
            PeerID.from_base58(peer_id), HANDLER, pb.ReachabilityRequest(endpoint=endpoint), pb.ReachabilityReply
        ),
        DIAL_TIMEOUT_S * 2,
    )
    return reply.reachable, reply.detail


async def check_reachable(dht: DHT, initial_peers: list[str], endpoint: str) -> tuple[bool | None, str]:
    """(True, "") when a node we joined through reached `endpoint`; (False, why) when one tried
    and failed; (None, why) when no node could be asked (first node of a swarm, old nodes)."""
    errors = []
    for maddr in initial_peers:
        peer_id = maddr.rsplit("/p2p/", 1)[-1] if "/p2p/" in maddr else None
        if not peer_id:
            continue
        try:
            ask = functools.partial(_ask, peer_id=peer_id, endpoint=endpoint)
            for _ in range(BUSY_RETRIES):  # peers starting together behind one address take turns
                reachable, detail = await dht.run_coroutine(ask, return_future=True)
                if detail != BUSY:
                    break
                await asyncio.sleep(random.uniform(0.5, 1.5) / DIALS_PER_S)
            return reachable, detail
        except Exception as e:  # that node cannot answer: try the next
            errors.append(f"{peer_id[-8:]}: {type(e).__name__}")
    return None, "; ".join(errors) or "no initial peers to ask"
