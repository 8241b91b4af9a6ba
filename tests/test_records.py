from __future__ import annotations

import pytest

from protos.envelope import Identity
from protos.records import PeerRecord, PeerState, expert_uid, parse_expert_uid

pytestmark = pytest.mark.unit  # pure logic: the fast subset

IDENTITY = Identity.generate()
OWNER = b"[owner:ssh-rsa AAAAowner]"
GOOD = PeerRecord.signed(
    IDENTITY,
    OWNER,
    endpoint="127.0.0.1:5000",
    state=PeerState.ONLINE,
    load=3,
    throughput=1e4,
    device="cpu",
    version="0",
)


def test_uid_roundtrip():
    assert parse_expert_uid(expert_uid("toy-abc", 3, 17)) == ("toy-abc", 3, 17)


@pytest.mark.parametrize("uid", ["", "a/b/c", "m/1", "m/1/2/3", "/1/2", "m/-1/2", "m o/1/2"])
def test_malformed_uids_are_refused(uid):
    with pytest.raises(ValueError, match="malformed"):
        parse_expert_uid(uid)


def test_record_roundtrip():
    assert PeerRecord.from_dict(GOOD.to_dict()) == GOOD


@pytest.mark.parametrize(
    "patch",
    [
        {"endpoint": ""},
        {"endpoint": "no-port"},
        {"endpoint": 5},
        {"load": -1},
        {"load": 1.5},
        {"throughput": "fast"},
        {"state": "sleeping"},
        {"device": "x" * 100},
        {"extra": 1},
        {"identity": b"short"},
        {"kx": "not bytes"},
        {"kx_sig": b"\0" * 63},
    ],
)
def test_bad_records_are_refused(patch):
    with pytest.raises(ValueError):
        PeerRecord.from_dict({**GOOD.to_dict(), **patch})


def test_non_dict_record_is_refused():
    with pytest.raises(ValueError, match="dict"):
        PeerRecord.from_dict([1, 2])


def test_only_online_peers_serve():
    assert [s for s in PeerState if s.serving] == [PeerState.ONLINE]


def test_kx_key_is_bound_to_identity_and_owner():
    assert GOOD.binds(OWNER)
    assert not GOOD.binds(b"[owner:ssh-rsa AAAAsomeone-else]")  # triple copied into another owner's record
    other = Identity.generate()
    assert not PeerRecord(**{**GOOD.__dict__, "kx": other.kx_public}).binds(OWNER)  # swapped kx key
    assert GOOD.peer_id == IDENTITY.fingerprint
