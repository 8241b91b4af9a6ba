"""The security envelope both sides share: identities, sessions, sealed payloads, receipts.

- Identity: a key file (0600) with an Ed25519 signing key (who you are), a static X25519
  key (peers publish its public half, signed, so coordinators can open sessions to them),
  and the RSA key hivemind's RSASignatureValidator signs DHT records with.
- Session: the coordinator sends an ephemeral X25519 key and a signed hello; both sides run
  X25519 + HKDF-SHA256 into a session id and one AES-256-GCM key per direction (AES-GCM:
  faster than ChaCha20-Poly1305 on CPUs with AES-NI; docs/benchmarks.md has the figures).
- Sealing: nonces are per-direction counters (a request's counter also seals its answer, under
  the other key); associated data binds session, request id, counter, timestamp, deadline,
  expert segments, dtype and shape, so a header cannot be moved onto another payload.
- Receipt: the peer signs a digest over the request's and the output's *plaintext* digests
  (AES-GCM is not key-committing, so the ciphertext alone would not bind the peer to a result),
  its expert uids and its model id.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .ed25519 import key_problem

KEY_FILE_VERSION = 1
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64
SESSION_ID_LEN = 16
TAG_LEN = 16
MAX_CLOCK_SKEW_S = 60.0  # hellos and requests stamped further from our clock are stale
_HELLO = b"moe-swarm/v1/hello"
_KX = b"moe-swarm/v1/kx"
_RECEIPT = b"moe-swarm/v1/receipt"


class EnvelopeError(Exception):
    """A message failed authentication (bad signature, tag, key, replay, stale time)."""


def _raw(public_key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(identity_public: bytes) -> str:
    """The short, stable name of an identity (peers are known by it in views and logs)."""
    return hashlib.sha256(identity_public).hexdigest()[:20]


@functools.lru_cache(maxsize=4096)
def _verifier(identity_public: bytes) -> Ed25519PublicKey:
    # decoding a public key (a point decompression) costs about as much as a verification;
    # a coordinator checks every answer against the few identities it talks to.
    # Small-order and non-canonical keys are refused here, so everywhere a key is accepted.
    if (problem := key_problem(identity_public)) is not None:
        raise ValueError(problem)
    return Ed25519PublicKey.from_public_bytes(identity_public)


def verify(identity_public: bytes, signature: bytes, data: bytes) -> bool:
    if len(identity_public) != PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
        return False
    try:
        _verifier(bytes(identity_public)).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """Ed25519 identity + static X25519 key + the RSA key that signs this node's DHT records."""

    def __init__(self, signing: Ed25519PrivateKey, kx: X25519PrivateKey, rsa_der: bytes | None = None) -> None:
        self._signing = signing
        self._kx = kx
        self.rsa_der = rsa_der
        self.public = _raw(signing.public_key())
        self.kx_public = _raw(kx.public_key())
        self.fingerprint = fingerprint(self.public)

    @classmethod
    def generate(cls) -> Identity:
        from hivemind.utils.crypto import RSAPrivateKey

        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate(), RSAPrivateKey().to_bytes())

    def sign(self, data: bytes) -> bytes:
        return self._signing.sign(data)

    def exchange(self, peer_public: bytes) -> bytes:
        return self._kx.exchange(X25519PublicKey.from_public_bytes(peer_public))

    def rsa_key(self):
        """hivemind RSAPrivateKey for DHT record signatures (restored the way hivemind unpickles it)."""
        from hivemind.utils.crypto import RSAPrivateKey

        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": self.rsa_der or RSAPrivateKey().to_bytes()})
        return key

    # ---- key file ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = {
            "version": KEY_FILE_VERSION,
            "ed25519": self._signing.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            ).hex(),
            "x25519": self._kx.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            ).hex(),
            "rsa": (self.rsa_der or b"").hex(),
            "public": self.public.hex(),
        }
        # created 0600 from the start: the secret never sits in a readable file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(raw, f, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"key file {path} is a directory: give the path of a file (created if absent)")
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"key file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
        try:
            raw = json.loads(path.read_text())
            if raw.get("version") != KEY_FILE_VERSION:
                raise ValueError(f"unsupported key file version {raw.get('version')!r}")
            return cls(
                Ed25519PrivateKey.from_private_bytes(bytes.fromhex(raw["ed25519"])),
                X25519PrivateKey.from_private_bytes(bytes.fromhex(raw["x25519"])),
                bytes.fromhex(raw["rsa"]) or None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"key file {path} is not a moe-swarm key file: {e}") from None

    @classmethod
    def load_or_create(cls, path: str | Path) -> Identity:
        try:
            return cls.load(path)
        except FileNotFoundError:
            identity = cls.generate()
            try:
                identity.save(path)
            except FileExistsError:  # another process created it first: use theirs
                return cls.load(path)
            return identity

    # ---- published key ----------------------------------------------------------------
    def sign_kx(self, owner: bytes) -> bytes:
        """Signs our X25519 key together with the DHT owner key of the record carrying it, so
        copying the (identity, kx, signature) triple into someone else's record is useless."""
        return self.sign(kx_statement(self.kx_public, owner))


def kx_statement(kx_public: bytes, owner: bytes) -> bytes:
    return _KX + kx_public + hashlib.sha256(owner).digest()


# ---- sessions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionKeys:
    session_id: bytes
    to_peer: AESGCM
    to_client: AESGCM


def _derive(shared: bytes, client_ephemeral: bytes, peer_kx: bytes, client_identity: bytes) -> SessionKeys:
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=SESSION_ID_LEN + 64,
        salt=None,
        info=b"moe-swarm/v1/session" + client_ephemeral + peer_kx + client_identity,
    ).derive(shared)
    return SessionKeys(okm[:SESSION_ID_LEN], AESGCM(okm[SESSION_ID_LEN:-32]), AESGCM(okm[-32:]))


def hello_statement(client_ephemeral: bytes, peer_kx: bytes, timestamp_ms: int) -> bytes:
    return _HELLO + client_ephemeral + peer_kx + struct.pack(">Q", timestamp_ms)


@dataclass(frozen=True)
class Hello:
    client_identity: bytes
    client_ephemeral: bytes
    timestamp_ms: int
    signature: bytes


def client_hello(identity: Identity, peer_kx: bytes, now_ms: int | None = None) -> tuple[Hello, SessionKeys]:
    """What a coordinator sends to open a session, and the keys it will use."""
    ephemeral = X25519PrivateKey.generate()
    eph_public = _raw(ephemeral.public_key())
    ts = now_ms if now_ms is not None else wall_ms()
    hello = Hello(identity.public, eph_public, ts, identity.sign(hello_statement(eph_public, peer_kx, ts)))
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(peer_kx))
    return hello, _derive(shared, eph_public, peer_kx, identity.public)


def precheck_hello(hello: Hello, now_ms: int | None = None) -> None:
    """The checks of a hello that cost no crypto: sizes (ValueError), freshness and the client's
    key (EnvelopeError). A peer runs them before anything else about a hello."""
    for name, value in (("client identity", hello.client_identity), ("ephemeral key", hello.client_ephemeral)):
        if len(value) != PUBLIC_KEY_LEN:
            raise ValueError(f"{name} must be {PUBLIC_KEY_LEN} bytes, got {len(value)}")
    check_fresh(hello.timestamp_ms, now_ms)
    if (problem := key_problem(hello.client_identity)) is not None:
        raise EnvelopeError(f"client identity refused: {problem}")


def accept_hello(identity: Identity, hello: Hello, now_ms: int | None = None) -> SessionKeys:
    """The peer's side; EnvelopeError when the hello is forged or stale (ValueError: malformed)."""
    precheck_hello(hello, now_ms)
    statement = hello_statement(hello.client_ephemeral, identity.kx_public, hello.timestamp_ms)
    if not verify(hello.client_identity, hello.signature, statement):
        raise EnvelopeError("hello signature does not verify")
    try:
        shared = identity.exchange(hello.client_ephemeral)
    except ValueError:  # low-order point: all-zero shared secret
        raise EnvelopeError("bad ephemeral key") from None
    return _derive(shared, hello.client_ephemeral, identity.kx_public, hello.client_identity)


def wall_ms() -> int:
    return int(time.time() * 1000)


def check_fresh(timestamp_ms: int, now_ms: int | None = None) -> None:
    now = now_ms if now_ms is not None else wall_ms()
    if abs(now - timestamp_ms) > MAX_CLOCK_SKEW_S * 1000:
        raise EnvelopeError(f"stale timestamp ({(now - timestamp_ms) / 1000:+.0f}s from this peer's clock)")


# ---- sealing ----------------------------------------------------------------------------
def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + struct.pack(">Q", counter)


def seal(aead: AESGCM, counter: int, plaintext: bytes | memoryview, ad: bytes) -> bytes:
    return aead.encrypt(_nonce(counter), plaintext, ad)


def open_sealed(aead: AESGCM, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return aead.decrypt(_nonce(counter), ciphertext, ad)
    except InvalidTag:
        raise EnvelopeError("sealed payload does not authenticate (tampered, or wrong key)") from None


def request_header(
    session_id: bytes,
    request_id: str,
    counter: int,
    timestamp_ms: int,
    deadline_ms: int,
    segments: Sequence[tuple[str, int]],
    dtype: str,
    shape: Sequence[int],
) -> bytes:
    """Canonical bytes of everything about a request except its payload (the AEAD's associated data)."""
    return json.dumps(
        [
            session_id.hex(),
            request_id,
            counter,
            timestamp_ms,
            deadline_ms,
            [list(s) for s in segments],
            dtype,
            list(shape),
        ],
        separators=(",", ":"),
    ).encode()


def response_header(request_header_bytes: bytes, dtype: str, shape: Sequence[int]) -> bytes:
    return hashlib.sha256(request_header_bytes).digest() + json.dumps([dtype, list(shape)]).encode()


# Below this many payload bytes a digest is computed inline: hashing costs less than handing
# the work to another thread and waking back up (docs/benchmarks.md, primitives).
DIGEST_OFFLOAD_BYTES = 1 << 20


def digest(header: bytes, payload: bytes | memoryview) -> bytes:
    """BLAKE3 of a header and its plaintext payload: what receipts sign. Every call hashes its
    payload on both sides, so the hash's speed is a per-byte cost of the whole swarm (BLAKE3
    is several times faster than SHA-256 on CPU); it releases the GIL on large inputs, so it overlaps compute."""
    h = blake3.blake3(header)
    h.update(payload)
    return h.digest()


def receipt_statement(request_digest: bytes, output_digest: bytes, uids: Sequence[str], model_id: str) -> bytes:
    return _RECEIPT + request_digest + output_digest + json.dumps([list(uids), model_id]).encode()


class ReplayWindow:
    """Accepts each counter once: anything at or below `highest - size` is refused as too old
    (a sliding window, as in IPsec/DTLS), so memory per session is constant."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.highest = -1
        self._seen = 0  # bit i set: counter (highest - i) was accepted

    def accept(self, counter: int) -> bool:
        if counter > self.highest:
            shift = counter - self.highest
            self._seen = ((self._seen << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.highest = counter
            return True
        offset = self.highest - counter
        if offset >= self.size or self._seen >> offset & 1:
            return False
        self._seen |= 1 << offset
        return True
