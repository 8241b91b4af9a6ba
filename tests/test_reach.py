"""The optional `reach` part of a peer record, and the frames relayed streams carry."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.utils.serializer import MSGPackSerializer

from protos.envelope import Identity
from protos.limits import MAX_RECORD_BYTES
from protos.reach import MAX_RELAYS, FrameError, Reach, circuit_addr, read_frame, write_frame
from protos.records import PeerRecord, PeerState

pytestmark = pytest.mark.unit

PEER = "12D3KooWByp4jgSurEicvoYv6GdwdtYqjdyKz6bayrgKCXWDYvwD"
RELAY = "/ip4/203.0.113.7/tcp/31337/p2p/12D3KooWMpmqh2QYqLCt6k41N7tpmNEpskxifLatFg7Kfpy1FRaZ"
REACH = Reach(PEER, (RELAY,))


def record(reach: Reach | None) -> PeerRecord:
    fields = dict(endpoint="10.0.0.2:5000", state=PeerState.ONLINE, load=0, throughput=1.0, device="cpu", version="0")
    return PeerRecord.signed(Identity.generate(), b"[owner:ssh-rsa AAAA]", **fields, reach=reach)


def test_a_relayed_record_round_trips_and_routes_over_libp2p():
    rec = record(REACH)
    assert PeerRecord.from_dict(rec.to_dict()) == rec
    assert rec.route == f"p2p/{PEER}"


def test_a_record_without_reach_reads_as_before():
    rec = record(None)
    assert "reach" not in rec.to_dict()
    assert PeerRecord.from_dict(rec.to_dict()) == rec and rec.route == "10.0.0.2:5000"


def test_the_largest_reach_fits_a_record():
    longest = "/dns/" + "r" * 100 + ".example/tcp/65535/p2p/" + PEER
    rec = record(Reach(PEER, tuple([longest] * MAX_RELAYS)))
    assert len(MSGPackSerializer.dumps(rec.to_dict())) <= MAX_RECORD_BYTES


@pytest.mark.parametrize(
    "raw",
    [
        "p2p",
        {"peer": PEER},
        {"peer": PEER, "relays": [RELAY], "extra": 1},
        {"peer": "not a peer id!", "relays": [RELAY]},
        {"peer": PEER, "relays": []},
        {"peer": PEER, "relays": [RELAY] * (MAX_RELAYS + 1)},
        {"peer": PEER, "relays": ["/ip4/1.2.3.4/tcp/1"]},  # no relay id
        {"peer": PEER, "relays": [RELAY + "/" + "x" * 300]},
        {"peer": PEER, "relays": [7]},
    ],
)
def test_malformed_reach_is_refused(raw):
    d = record(None).to_dict()
    d["reach"] = raw
    with pytest.raises(ValueError, match="reach"):
        PeerRecord.from_dict(d)


def test_circuit_addresses_carry_the_relay_id_as_the_daemon_reads_it():
    from hivemind.p2p import PeerID

    data = circuit_addr(RELAY).to_bytes()
    relay_id = PeerID.from_base58(RELAY.rsplit("/", 1)[-1]).to_bytes()
    assert b"\xa5\x03" + bytes([len(relay_id)]) + relay_id in data  # /p2p/<multihash>, not a CID
    assert data.endswith(b"\xa2\x02")  # /p2p-circuit


def frames(data: bytes, limit: int) -> list[bytes | None]:
    async def read() -> list[bytes | None]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        out = []
        while (frame := await read_frame(reader, limit)) is not None:
            out.append(frame)
        return out

    return asyncio.run(read())


class _Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, chunk: bytes) -> None:
        self.data += chunk


def test_frames_round_trip_and_oversized_ones_are_refused_before_reading():
    sink = _Sink()
    write_frame(sink, b"abc")
    write_frame(sink, b"")
    assert frames(sink.data, 3) == [b"abc", b""]
    with pytest.raises(FrameError, match="exceeds"):
        frames((1 << 40).to_bytes(8, "big"), 1024)  # a claimed terabyte: refused on the header
    with pytest.raises(FrameError, match="inside a frame"):
        frames(sink.data[:5], 1024)


def test_initial_peers_from_a_file(tmp_path):
    from coordinator.cli import build_parser as swarm_parser
    from peer.cli import build_parser as peer_parser

    swarm = tmp_path / "swarm.txt"
    swarm.write_text(f"# the example swarm\n{RELAY}\n\n  {RELAY[:-1]}Z  \n")
    want = [RELAY, RELAY[:-1] + "Z"]
    assert peer_parser().parse_args(["serve", "--seed", "0", "--initial-peers", f"@{swarm}"]).initial_peers == want
    args = swarm_parser().parse_args(["status", "--model", "m", "--initial-peers", "/ip4/1.1.1.1/tcp/1", f"@{swarm}"])
    assert args.initial_peers == ["/ip4/1.1.1.1/tcp/1", *want]
