"""Dial-back reachability check over the DHT's libp2p connections.

Every moe-swarm DHT node (bootstrap and peers) answers "can you reach host:port?" by opening
a TCP connection to it; a starting peer asks the nodes it joined through before announcing
its endpoint, so a NATed or mis-addressed peer is told what to fix instead of publishing a
dead address. Handlers run inside the DHT process (hivemind's `run_coroutine`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from protos import expert_service_pb2 as pb

if TYPE_CHECKING:
    from hivemind import DHT
    from hivemind.dht.node import DHTNode

HANDLER = "moe_swarm.v1.reachability"
DIAL_TIMEOUT_S = 3.0


async def _dial(request: pb.ReachabilityRequest, context: object) -> pb.ReachabilityReply:
    host, _, port = request.endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return pb.ReachabilityReply(reachable=False, detail=f"malformed endpoint {request.endpoint!r}")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), DIAL_TIMEOUT_S)
    except (OSError, TimeoutError) as e:
        return pb.ReachabilityReply(reachable=False, detail=f"{type(e).__name__}: {e}".strip(": "))
    writer.close()
    return pb.ReachabilityReply(reachable=True)


async def _register(dht: DHT, node: DHTNode) -> None:
    await node.protocol.p2p.add_protobuf_handler(HANDLER, _dial, pb.ReachabilityRequest)


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
    import functools

    errors = []
    for maddr in initial_peers:
        peer_id = maddr.rsplit("/p2p/", 1)[-1] if "/p2p/" in maddr else None
        if not peer_id:
            continue
        try:
            ask = functools.partial(_ask, peer_id=peer_id, endpoint=endpoint)
            return await dht.run_coroutine(ask, return_future=True)
        except Exception as e:  # that node cannot answer: try the next
            errors.append(f"{peer_id[-8:]}: {type(e).__name__}")
    return None, "; ".join(errors) or "no initial peers to ask"
