"""Records that try to lure a coordinator's traffic: junk from throwaway identities, refused
endpoints, and what one bad identity may cost.

A real hivemind DHT node run by the test (the attacker) stores records signed by 24 throwaway
owner keys, each a valid PeerRecord naming the experts of our own checkpoint, claiming huge
throughput and no load, at a tarpit (a port that accepts connections and never answers) or a
closed port. Records naming a unix socket or a gRPC scheme are refused by every honest node.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from coordinator.client import SwarmClient
from coordinator.dispatch.probe import PROBE_TIMEOUT_S
from protos import toy_model
from protos.envelope import Identity
from protos.records import PeerRecord, PeerState

from .conftest import TINY

H = TINY.hidden_dim
JUNK_IDENTITIES = 24
DEADLINE_S = 5.0  # each layer call's deadline: a call that succeeds finished within it
REFUSED = ["unix:/tmp/moe.sock", "dns:///127.0.0.1:1", "unix:5"]  # endpoints every honest node refuses


class ManyOwners(RSASignatureValidator):
    """Signs each record with the throwaway key whose owner marker is its subkey (hivemind's
    validator signs with one key per node); validates as RSASignatureValidator does."""

    def __init__(self, keys: list[RSAPrivateKey]) -> None:
        super().__init__(keys[0])
        self.by_marker = {RSASignatureValidator(k).local_public_key: k for k in keys}

    def sign_value(self, record: DHTRecord) -> bytes:
        key = next((k for marker, k in self.by_marker.items() if marker in record.subkey), None)
        if key is None:
            return record.value
        return record.value + self.SIGNATURE_FORMAT.replace(b"_value_", key.sign(self._serialize_record(record)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("lure") / "ckpt"
    toy_model.save_checkpoint(path, TINY, seed=202)
    return path


@pytest.fixture(scope="module")
def honest(swarm, ckpt):
    proc = swarm.start_peer("lure-honest", "--checkpoint", str(ckpt), "--experts", "0:*", "--threads", "1")
    yield proc.info["peer_id"]
    swarm.stop(proc)


@pytest.fixture(scope="module")
def tarpit():
    """Accepts connections (the kernel does, into the backlog) and never reads or answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def record(identity: Identity, owner: bytes, endpoint: str) -> dict:
    lure = dict(endpoint=endpoint, state=PeerState.ONLINE, load=0, throughput=1e12, device="gpu", version="1")
    return PeerRecord.signed(identity, owner, **lure).to_dict()


def test_junk_records_cost_a_fresh_coordinator_a_bounded_time(swarm, ckpt, honest, tarpit):
    uids = toy_model.read_manifest(ckpt).uids()[: TINY.num_experts]
    keys = [RSAPrivateKey() for _ in range(JUNK_IDENTITIES + 3)]
    owners = [RSASignatureValidator(k).local_public_key for k in keys]
    attacker = DHT(
        initial_peers=swarm.initial_peers,
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        record_validators=[ManyOwners(keys)],
    )
    try:
        expires = get_dht_time() + 120
        junk = {i: Identity.generate() for i in range(JUNK_IDENTITIES)}
        for i, identity in junk.items():
            endpoint = tarpit if i % 2 else "127.0.0.1:1"  # a tarpit, or a closed port
            for uid in uids:
                attacker.store(uid, record(identity, owners[i], endpoint), expires, subkey=owners[i])
        # endpoints that are not host:port: every honest node refuses them (the attacker's own
        # node keeps them, so whether store() reports success depends on which node answered last)
        for j, endpoint in enumerate(REFUSED):
            owner = owners[JUNK_IDENTITIES + j]
            attacker.store(uids[0], record(Identity.generate(), owner, endpoint), expires, subkey=owner)
    finally:
        attacker.shutdown()  # what honest nodes accepted outlives it
    # a reader that checks signatures only: what the honest nodes hold, valid or not
    reader = DHT(
        initial_peers=swarm.initial_peers,
        start=True,
        client_mode=True,
        record_validators=[RSASignatureValidator(RSAPrivateKey())],
    )
    try:
        held = reader.get(uids[0], latest=True)
        stored = {v.value["endpoint"] for v in held.value.values()} if held is not None else set()
    finally:
        reader.shutdown()
    assert tarpit in stored and "127.0.0.1:1" in stored and not stored & set(REFUSED)
    with SwarmClient(swarm.initial_peers, uids, timeout=DEADLINE_S, fallback="error") as client:
        client.io.run(client.swarm.refresh())
        seen = {r.record.endpoint for uid in uids for r in client.swarm.replicas(uid)}
        junk_ids = {r.peer_id for uid in uids for r in client.swarm.replicas(uid) if r.peer_id != honest}
        client.wait_for_experts(timeout=30)
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):  # each call must finish within its deadline, or raise
            x = torch.randn(8, H, generator=gen)
            experts = torch.stack([torch.randperm(TINY.num_experts, generator=gen)[:2] for _ in range(8)])
            assert client.dispatch(x, experts, uids, torch.float32).complete
        stats = client.dispatcher.stats
        health = client.dispatcher.health
        reachable = {p for p in junk_ids if health.get(p).reachable}
        time.sleep(PROBE_TIMEOUT_S + 1)  # every probe has timed out by now
        unreachable = {p for p in junk_ids if health.get(p).reachable is False}
    assert len(junk_ids) >= JUNK_IDENTITIES // 2, "the junk records reached the coordinator's view"
    assert tarpit in seen and not any(e.startswith(("unix", "dns")) for e in seen)
    assert set(stats.rpcs_by_peer) == {honest}  # no real work went to a junk identity
    assert stats.exact == stats.routed and stats.retries == 0
    assert not reachable and unreachable == junk_ids  # each probed in the background, and found out


def test_non_finite_answers_are_refused_and_the_work_goes_elsewhere(swarm, ckpt, honest):
    uids = toy_model.read_manifest(ckpt).uids()[: TINY.num_experts]
    args = ["--checkpoint", str(ckpt), "--experts", "0:*", "--threads", "1", "--sim-corrupt", "inf"]
    proc = swarm.start_peer("lure-nan", *args)
    broken = proc.info["peer_id"]
    try:
        with SwarmClient(swarm.initial_peers, uids, timeout=DEADLINE_S, fallback="error") as client:
            health = client.dispatcher.health
            health.get(broken).observe(0.1)  # it looks fast and proven: it is asked first
            health.get(honest).observe(1000.0)
            client.wait_for_experts(timeout=30)
            x = torch.randn(8, H, generator=torch.Generator().manual_seed(1))
            result = client.dispatch(x, torch.tensor([[0, 1]] * 8), uids, torch.float32)
            stats = client.dispatcher.stats
            banned = health.banned(broken)
    finally:
        swarm.stop(proc)
    assert result.complete and bool(torch.isfinite(result.outputs).all())
    assert stats.nonfinite >= 1 and banned and set(stats.rpcs_by_peer) == {honest}
