"""Which Ed25519 public keys this swarm accepts: canonical encodings of points outside the
small-order subgroup.

OpenSSL's Ed25519 verification accepts any 32 bytes that decode to a curve point. A key of
small order (the identity, the all-zero encoding, the other torsion points) makes `verify`
succeed for a large fraction of messages with a trivial signature (the all-zero key and
signature verify about one message in four), so such a key proves nothing about who signed.
A non-canonical encoding (y >= p, or x = 0 with the sign bit set) names a point that has
another, canonical encoding: two byte strings for one identity. Both are refused wherever a
key is accepted (hellos, records, receipts), through `envelope.verify`.

The check is a comparison, no curve arithmetic: the small-order points are exactly the
eight torsion points, whose y coordinates are 1 (the identity), p - 1 (order 2), 0 (order 4)
and +-Y8 (order 8); tests/test_hostile_keys.py derives that set from the curve equation.
"""

from __future__ import annotations

P = 2**255 - 19
KEY_LEN = 32
# y of the order-8 points (libsodium's blacklist lists the same encodings)
Y8 = 0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826
SMALL_ORDER_Y = frozenset({0, 1, P - 1, Y8, P - Y8})


def key_problem(raw: bytes) -> str | None:
    """Why `raw` is not an acceptable Ed25519 public key, or None when it is (a key that is
    not a curve point at all is refused by the library that loads it)."""
    if len(raw) != KEY_LEN:
        return f"an Ed25519 public key is {KEY_LEN} bytes, not {len(raw)}"
    n = int.from_bytes(raw, "little")
    sign, y = n >> 255, n & ((1 << 255) - 1)
    if y >= P or (sign and y in (1, P - 1)):  # y out of range, or -0 for a point with x = 0
        return "not a canonical encoding of a curve point"
    if y in SMALL_ORDER_Y:
        return "a point of small order"
    return None


def acceptable(raw: bytes) -> bool:
    return key_problem(bytes(raw)) is None
