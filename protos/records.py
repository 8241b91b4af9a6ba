"""DHT keys and the record a peer announces for each expert it hosts.

Layout: one DHT dictionary key per expert uid, one subkey per hosting peer, value =
PeerRecord.to_dict(). Several peers can host the same expert; each owns only its own
subkey: the subkey *is* the peer's RSA owner marker (`[owner:ssh-rsa ...]`), so hivemind's
RSASignatureValidator makes every node refuse a write to it not signed by that key (a
marker in the key would not be enforced: keys are hashed before validators see them).
protos.validation.PeerRecordValidator refuses everything else; every node runs both.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .endpoints import parse_endpoint
from .envelope import PUBLIC_KEY_LEN, SIGNATURE_LEN, fingerprint, kx_statement, verify
from .reach import Reach

if TYPE_CHECKING:
    from .envelope import Identity

UID_SEPARATOR = "/"
_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PeerState(StrEnum):
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
    LEFT = "left"  # tombstone written on leave so every reader drops the peer at once

    @property
    def serving(self) -> bool:
        return self is PeerState.ONLINE

    @property
    def refusal(self) -> str:
        """The UNAVAILABLE detail a peer in this state answers requests with: coordinators read
        it as "not serving now" (go elsewhere, no ban), not as a failure."""
        return f"{NOT_SERVING}: {self.value}"


NOT_SERVING = "peer is not serving"
OPTIONAL_FIELDS = frozenset({"reach", "model"})


MAX_TEXT_LEN = 64  # a record's free-text fields (device, version)


def check_text(name: str, value: object) -> None:
    """A record's free-text field: printable characters only (no escape sequences, newlines or
    other control characters), at most MAX_TEXT_LEN of them; ValueError otherwise. Printable
    text can still hold markup ("[/]"): whoever shows it escapes it as well."""
    if not isinstance(value, str) or len(value) > MAX_TEXT_LEN or not value.isprintable():
        raise ValueError(f"bad {name} {value!r}: printable text of at most {MAX_TEXT_LEN} characters")


def expert_uid(model_id: str, layer: int, expert: int) -> str:
    if not _MODEL_ID_RE.match(model_id):
        raise ValueError(f"invalid model id {model_id!r}")
    if layer < 0 or expert < 0:
        raise ValueError(f"layer and expert must be >= 0, got {layer}, {expert}")
    return f"{model_id}{UID_SEPARATOR}{layer}{UID_SEPARATOR}{expert}"


def model_family(model_id: str) -> str:
    """The part of a model id that names the architecture, not the weights ("mixtral" of
    "mixtral-0123456789abcdef"): peers of one family serving other weights share it."""
    short, _, digest = model_id.rpartition("-")
    return short if short and len(digest) == 16 and all(c in "0123456789abcdef" for c in digest) else model_id


def models_key(model_id: str) -> str:
    """The DHT key every peer serving a model of `model_id`'s family also announces under, so a
    coordinator that finds no replica of its own model can say which models the swarm does serve
    (two parts, so it is never an expert uid)."""
    return f"models{UID_SEPARATOR}{model_family(model_id)}"


def parse_expert_uid(uid: str) -> tuple[str, int, int]:
    """(model_id, layer, expert) of a uid; ValueError with the reason otherwise."""
    parts = uid.split(UID_SEPARATOR)
    if len(parts) != 3 or not _MODEL_ID_RE.match(parts[0]) or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"malformed expert uid {uid!r}; expected '<model_id>/<layer>/<expert>'")
    return parts[0], int(parts[1]), int(parts[2])


@dataclass(frozen=True)
class PeerRecord:
    """What a peer says about itself under each expert key it hosts."""

    endpoint: str  # host:port of its gRPC server
    state: PeerState
    load: int  # token rows queued or in flight right now
    throughput: float  # tokens/s the peer measured for itself (0 = unknown)
    device: str
    version: str
    identity: bytes = b""  # Ed25519 public key: receipts verify against it; the peer's name is its fingerprint
    kx: bytes = b""  # static X25519 public key coordinators open sessions to
    kx_sig: bytes = b""  # identity's signature over (kx, this record's DHT owner)
    reach: Reach | None = None  # optional: reached over libp2p through relays, not at the endpoint
    model: str = ""  # optional: the model id it serves (read under models_key)

    @property
    def route(self) -> str:
        """Where a coordinator sends requests: the gRPC endpoint, or the relayed peer's route."""
        return self.reach.route if self.reach is not None else self.endpoint

    @classmethod
    def signed(cls, identity: Identity, owner: bytes, **fields: Any) -> PeerRecord:
        """A record carrying `identity`'s keys, its X25519 key signed for this DHT `owner`."""
        return cls(**fields, identity=identity.public, kx=identity.kx_public, kx_sig=identity.sign_kx(owner))

    @property
    def peer_id(self) -> str:
        return fingerprint(self.identity)

    def binds(self, owner: bytes) -> bool:
        """The identity vouches for this kx key under this DHT owner (see envelope.Identity.sign_kx)."""
        return verify(self.identity, self.kx_sig, kx_statement(self.kx, owner))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        if not self.model:
            del d["model"]
        if self.reach is None:
            del d["reach"]  # records without it read the same everywhere
        else:
            d["reach"] = self.reach.to_raw()
        return d

    @classmethod
    def from_dict(cls, raw: Any) -> PeerRecord:
        """Strict parse of an untrusted DHT value; ValueError names what is wrong."""
        if not isinstance(raw, dict):
            raise ValueError(f"peer record must be a dict, got {type(raw).__name__}")
        expected = {f for f in cls.__dataclass_fields__} - OPTIONAL_FIELDS
        if set(raw) - OPTIONAL_FIELDS != expected:
            raise ValueError(f"peer record fields {sorted(raw)} != {sorted(expected)}")
        endpoint = raw["endpoint"]
        parse_endpoint(endpoint)
        load, throughput = raw["load"], raw["throughput"]
        if not isinstance(load, int) or load < 0:
            raise ValueError(f"bad load {load!r}")
        if not isinstance(throughput, int | float) or throughput < 0:
            raise ValueError(f"bad throughput {throughput!r}")
        for name in ("device", "version"):
            check_text(name, raw[name])
        model = raw.get("model", "")
        if model and not (isinstance(model, str) and _MODEL_ID_RE.match(model)):
            raise ValueError(f"bad model {model!r}")
        for name, size in (("identity", PUBLIC_KEY_LEN), ("kx", PUBLIC_KEY_LEN), ("kx_sig", SIGNATURE_LEN)):
            if not isinstance(raw[name], bytes) or len(raw[name]) != size:
                raise ValueError(f"{name} must be {size} bytes")
        return cls(
            endpoint=endpoint,
            state=PeerState(raw["state"]),
            load=load,
            throughput=float(throughput),
            device=raw["device"],
            version=raw["version"],
            identity=raw["identity"],
            kx=raw["kx"],
            kx_sig=raw["kx_sig"],
            reach=Reach.from_raw(raw["reach"]) if "reach" in raw else None,
            model=model,
        )


def count_serving(raw: dict[str, dict[str, tuple[object, float]]], now: float) -> dict[str, int]:
    """uid -> number of peers whose valid, unexpired record says they serve it."""
    counts = {}
    for uid, subkeys in raw.items():
        n = 0
        for value, expiration in subkeys.values():
            try:
                n += expiration > now and PeerRecord.from_dict(value).state.serving
            except (ValueError, KeyError, TypeError):
                continue
        counts[uid] = n
    return counts
