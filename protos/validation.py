"""The DHT validators every node of a moe-swarm DHT runs (bootstrap, peers, coordinators).

hivemind's RSASignatureValidator refuses a write to a subkey holding an owner marker unless
the owner's key signed it; PeerRecordValidator refuses everything else: unsigned values,
subkeys that are not an owner marker, values that are not a strict PeerRecord, and records
whose X25519 key is not signed by the identity they name for this very owner. hivemind's
SchemaValidator maps fixed key names; our keys are per expert uid, so the strict schema is
applied to every record instead.
"""

from __future__ import annotations

import re

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey

from .limits import MAX_RECORD_BYTES
from .records import PeerRecord


class PeerRecordValidator(RecordValidatorBase):
    """Admits only owner-signed peer records (runs after RSASignatureValidator checked and
    stripped the signature)."""

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) > MAX_RECORD_BYTES:
            return False
        try:
            owner = MSGPackSerializer.loads(record.subkey)
            if not isinstance(owner, bytes) or not _OWNER_RE.fullmatch(owner):
                return False
            return PeerRecord.from_dict(MSGPackSerializer.loads(record.value)).binds(owner)
        except Exception:  # anything unparsable is simply not a valid record
            return False


_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


def dht_validators(rsa_key: RSAPrivateKey | None = None) -> list[RecordValidatorBase]:
    """The validators every node of a moe-swarm DHT runs; `rsa_key` signs this node's own
    records (nodes that store nothing can leave it out: a throwaway key is made)."""
    return [RSASignatureValidator(rsa_key or RSAPrivateKey()), PeerRecordValidator()]


def owner_subkey(rsa_key: RSAPrivateKey) -> bytes:
    """The subkey a peer announces under: its owner marker, so only it can write there."""
    return RSASignatureValidator(rsa_key).local_public_key
