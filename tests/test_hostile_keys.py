"""Pure logic of the hostile-swarm bounds: which Ed25519 keys are refused, the session table's
eviction, the memory of used hellos (real-process attacks: test_hostile_auth.py)."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from peer.hellos import HelloGuard, HelloRefused
from peer.sessions import SessionTable
from protos import envelope
from protos.ed25519 import SMALL_ORDER_Y, P, key_problem
from protos.envelope import Identity
from protos.records import PeerRecord, PeerState

pytestmark = pytest.mark.unit

D = (-121665 * pow(121666, P - 2, P)) % P


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    return (x1 * y2 + y1 * x2) * pow(1 + t, P - 2, P) % P, (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P


def _x_for(y: int) -> int | None:
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x2 = u * pow(v, P - 2, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if x * x % P != x2:
        x = x * pow(2, (P - 1) // 4, P) % P
    return x if x * x % P == x2 else None


def test_the_small_order_set_is_the_torsion_subgroup():
    # every listed y is on the curve and 8P is the identity; a real key's point is not small
    for y in SMALL_ORDER_Y:
        x = _x_for(y)
        assert x is not None
        point = (x, y)
        for _ in range(3):
            point = _add(point, point)
        assert point == (0, 1)
    y = int.from_bytes(Identity.generate().public, "little") & ((1 << 255) - 1)
    point = (_x_for(y), y)
    for _ in range(3):
        point = _add(point, point)
    assert point != (0, 1)


def small_order_keys() -> list[bytes]:
    keys = [y.to_bytes(32, "little") for y in SMALL_ORDER_Y]
    return keys + [(y | 1 << 255).to_bytes(32, "little") for y in SMALL_ORDER_Y if y not in (1, P - 1)]


def test_small_order_and_non_canonical_keys_are_refused_by_verify():
    messages = [os.urandom(32) for _ in range(64)]

    def library_accepts(key: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(bytes(64), messages[0])
        except (InvalidSignature, ValueError):
            return False
        return True

    # the library alone accepts the all-zero key with an all-zero signature for some messages
    zero = Ed25519PublicKey.from_public_bytes(bytes(32))
    accepted = 0
    for m in messages:
        try:
            zero.verify(bytes(64), m)
            accepted += 1
        except InvalidSignature:
            pass
    assert accepted > 0
    for key in small_order_keys():
        assert key_problem(key) == "a point of small order"
        assert not any(envelope.verify(key, bytes(64), m) for m in messages)
    non_canonical = [(P + 1).to_bytes(32, "little"), (1 | 1 << 255).to_bytes(32, "little"), b"\xff" * 32]
    for key in non_canonical:
        assert key_problem(key) == "not a canonical encoding of a curve point"
        assert not envelope.verify(key, bytes(64), messages[0])
    assert library_accepts(bytes(32)) in (True, False)  # loads: only our check refuses it
    honest = Identity.generate()
    assert key_problem(honest.public) is None and envelope.verify(honest.public, honest.sign(b"m"), b"m")


def test_records_and_hellos_with_a_small_order_identity_are_refused():
    owner = b"owner"
    peer = Identity.generate()
    fields = dict(endpoint="127.0.0.1:1", state=PeerState.ONLINE, load=0, throughput=1.0, device="cpu", version="1")
    record = PeerRecord(**fields, identity=bytes(32), kx=peer.kx_public, kx_sig=bytes(64))
    assert not record.binds(owner)
    hello = envelope.Hello(bytes(32), Identity.generate().kx_public, envelope.wall_ms(), bytes(64))
    with pytest.raises(envelope.EnvelopeError, match="small order"):
        envelope.accept_hello(peer, hello)


def _keys(peer: Identity) -> envelope.SessionKeys:
    return envelope.accept_hello(peer, envelope.client_hello(Identity.generate(), peer.kx_public)[0])


def test_a_flooding_identity_or_address_evicts_only_its_own_sessions():
    peer = Identity.generate()
    table = SessionTable(max_sessions=8, ttl_s=60, per_identity=3, per_address=5)
    honest = _keys(peer)
    table.add(honest, b"honest", "10.0.0.1")
    flood = [_keys(peer) for _ in range(10)]
    for k in flood:  # one identity from one address
        table.add(k, b"flooder", "10.0.0.2")
    assert table.get(honest.session_id) is not None
    assert table.count(b"flooder") == 3 and table.get(flood[0].session_id) is None  # its own oldest went
    for i, k in enumerate(_keys(peer) for _ in range(12)):  # fresh identities from one address
        table.add(k, f"sybil-{i}".encode(), "10.0.0.3")
    assert table.count("10.0.0.3") <= 5 and table.get(honest.session_id) is not None
    for i in range(3):  # new addresses: the full table evicts from the most crowded address
        table.add(_keys(peer), b"x%d" % i, f"10.1.0.{i}")
    assert len(table) == 8 and table.get(honest.session_id) is not None


def test_a_used_hello_is_refused_until_it_is_stale():
    guard = HelloGuard(per_address_rate=1000, burst=1000, max_remembered=2)
    eph = os.urandom(32)
    guard.admit(eph, "a")
    guard.used(eph, envelope.wall_ms())
    with pytest.raises(HelloRefused) as info:
        guard.admit(eph, "a")
    assert info.value.replay
    guard.used(os.urandom(32), envelope.wall_ms())
    with pytest.raises(HelloRefused) as info:  # memory full: refused, nothing forgotten early
        guard.admit(os.urandom(32), "a")
    assert not info.value.replay
    stale = HelloGuard()
    stale.used(eph, envelope.wall_ms() - int(envelope.MAX_CLOCK_SKEW_S * 1000) - 2000)
    stale.admit(eph, "a")  # forgotten once the timestamp check refuses it anyway
    assert len(stale) == 0


def test_hellos_per_address_are_rate_limited():
    guard = HelloGuard(per_address_rate=0.001, burst=3)
    for _ in range(3):
        guard.admit(os.urandom(32), "a")
    with pytest.raises(HelloRefused, match="too many hellos"):
        guard.admit(os.urandom(32), "a")
    guard.admit(os.urandom(32), "b")  # another address has its own budget
