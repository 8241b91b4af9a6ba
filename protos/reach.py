"""How to reach a peer that nobody can dial: its libp2p peer id and the circuit relays it holds
a reservation at. The optional `reach` part of a PeerRecord (protos/records.py); a record
without it is reached at its gRPC endpoint.

Over libp2p the peer serves the same ExpertService messages on stream protocols (OPEN for a
session hello, FORWARD for a ForwardStream, INFO for Info), each message one frame: an 8-byte big-endian
length, then the serialized protobuf. Requests and answers are sealed above this transport
(protos/envelope.py), so a relay forwards ciphertext only.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

OPEN = "/moe-swarm/expert/open/1"
FORWARD = "/moe-swarm/expert/forward/1"
INFO = "/moe-swarm/expert/info/1"  # no request; one InfoResponse frame back
MAX_INFO_BYTES = 1 << 20  # an InfoResponse lists the peer's experts: bounded by their count
ACCEPTED, REFUSED = b"\x00", b"\x01"  # an OPEN answer: a SessionAccept, or a Refusal, after this byte
MAX_RELAYS = 4  # relay addresses one record may name
MAX_MADDR_LEN = 200  # one relay's multiaddr: /ip4|ip6|dns/<host>/tcp|udp/<port>/.../p2p/<peer id>
FRAME_HEADER = 8
MAX_HELLO_BYTES = 4096  # a SessionHello or SessionAccept is a few hundred bytes
# a libp2p peer id in base58 (Ed25519 and RSA keys' identity or sha256 multihashes)
_PEER_ID_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{32,64}$")
_MADDR_RE = re.compile(r"^(/[A-Za-z0-9][A-Za-z0-9._-]*)+/p2p/[1-9A-HJ-NP-Za-km-z]{32,64}$")
_P2P_CODE = b"\xa5\x03"  # the /p2p/ protocol's varint code (421)


class FrameError(ConnectionError):
    """A frame over the agreed size, or a stream that ended inside one."""


@dataclass(frozen=True)
class Reach:
    peer: str  # the peer's libp2p id (base58)
    relays: tuple[str, ...]  # multiaddrs of relays holding a reservation for it, ending /p2p/<relay id>

    def to_raw(self) -> dict[str, Any]:
        return {"peer": self.peer, "relays": list(self.relays)}

    @classmethod
    def from_raw(cls, raw: Any) -> Reach:
        """Strict parse of an untrusted record part; ValueError names what is wrong."""
        if not isinstance(raw, dict) or set(raw) != {"peer", "relays"}:
            raise ValueError("reach must be a dict with exactly 'peer' and 'relays'")
        peer, relays = raw["peer"], raw["relays"]
        if not isinstance(peer, str) or not _PEER_ID_RE.match(peer):
            raise ValueError("reach.peer is not a libp2p peer id")
        if not isinstance(relays, list | tuple) or not 0 < len(relays) <= MAX_RELAYS:
            raise ValueError(f"reach.relays must list 1 to {MAX_RELAYS} relay multiaddrs")
        for maddr in relays:
            if not isinstance(maddr, str) or len(maddr) > MAX_MADDR_LEN or not _MADDR_RE.match(maddr):
                raise ValueError("reach.relays holds a malformed relay multiaddr")
        return cls(peer, tuple(relays))

    def describe(self) -> str:
        """How people see it in status and dashboards: the relays by the end of their ids."""
        return "relayed via " + ", ".join(f"{r.split('/')[2]}/..{r[-6:]}" for r in self.relays)

    @property
    def route(self) -> str:
        """The key a coordinator's transport caches this peer's connection under."""
        return f"p2p/{self.peer}"


class _RawMaddr:
    """A multiaddr already in its binary form (what the daemon's control protocol carries)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def to_bytes(self) -> bytes:
        return self.data


def circuit_addr(relay_maddr: str) -> _RawMaddr:
    """`<relay maddr>/p2p-circuit` in binary form. (hivemind's Multiaddr writes /p2p/ values as
    CIDs, which the daemon does not parse, so that component is encoded here.)"""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    base, _, relay_id = relay_maddr.rpartition("/p2p/")
    peer = PeerID.from_base58(relay_id).to_bytes()
    data = Multiaddr(base).to_bytes() + _P2P_CODE + bytes([len(peer)]) + peer + Multiaddr("/p2p-circuit").to_bytes()
    return _RawMaddr(data)


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """One frame's payload; None when the stream ended cleanly between frames."""
    try:
        header = await reader.readexactly(FRAME_HEADER)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise FrameError("the stream ended inside a frame header") from None
        return None
    size = int.from_bytes(header, "big")
    if size > limit:
        raise FrameError(f"a {size}-byte frame exceeds the {limit}-byte limit")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise FrameError("the stream ended inside a frame") from None


def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(len(payload).to_bytes(FRAME_HEADER, "big"))
    writer.write(payload)
