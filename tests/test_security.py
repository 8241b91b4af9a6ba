"""Only the chosen peer reads activations; forgeries, replays and cheats are refused or caught."""

from __future__ import annotations

import os
import random
import time

import grpc
import psutil
import pytest
import torch
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from coordinator.client import SwarmClient
from protos import envelope, toy_model
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos.envelope import Identity
from protos.records import PeerRecord, PeerState

from .conftest import TINY, greedy, local_model
from .sealing import SealedStub
from .tcp_proxy import RecordingProxy, free_port

H = TINY.hidden_dim
TOY = ["--threads", "1", "--announce-period", "2"]


def rows_of(t: torch.Tensor) -> list[bytes]:
    return [r.contiguous().numpy().tobytes() for r in t]


def test_activations_never_cross_the_wire_in_clear(swarm, tmp_path):
    ckpt = tmp_path / "wire"
    toy_model.save_checkpoint(ckpt, TINY, seed=41)
    uids = toy_model.read_manifest(ckpt).uids()[: TINY.num_experts]
    port = free_port()
    proxy = RecordingProxy(port)
    # the peer listens on `port` but announces the proxy: every coordinator byte passes through it
    proc = swarm.start_peer(
        "wire",
        "--checkpoint",
        str(ckpt),
        "--experts",
        "0:*",
        "--port",
        str(port),
        "--announce-port",
        str(proxy.port),
        "--allow-plaintext",
        *TOY,
    )
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(3))
    experts = torch.tensor([[0, 1]] * 16)
    try:
        with SwarmClient(swarm.initial_peers, uids, timeout=20) as client:
            client.wait_for_experts(timeout=30)
            out = client.dispatch(x, experts, uids, torch.float32).outputs
        assert proxy.captured, "nothing went through the proxy"
        secret = rows_of(x) + rows_of(out[:, 0]) + rows_of(out[:, 1])
        assert not any(proxy.seen(r) for r in secret)
        # the same search finds plaintext when sealing is off: the check above can fail
        with SwarmClient(swarm.initial_peers, uids, timeout=20, secure=False) as client:
            client.wait_for_experts(timeout=30)
            client.dispatch(x, experts, uids, torch.float32)
        assert sum(proxy.seen(r) for r in rows_of(x)) > len(x) // 2
    finally:
        proxy.close()
        swarm.stop(proc)


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def tampered(s: SealedStub, uid):
    sent = s.build(uid, torch.ones(2, H))
    data = bytearray(sent.request.inputs.data)
    data[5] ^= 1
    sent.request.inputs.data = bytes(data)
    return sent.request


def wrong_key(s: SealedStub, uid):
    _, other = envelope.client_hello(s.identity, s.peer_kx)  # same session id, keys the peer never derived
    sent = s.build(uid, torch.ones(2, H))
    sent.request.inputs.data = envelope.seal(other.to_peer, sent.request.counter, sent.plaintext, sent.header)
    return sent.request


def stale(s: SealedStub, uid, monkeypatch):
    real = envelope.wall_ms
    monkeypatch.setattr(envelope, "wall_ms", lambda: real() - 300_000)  # sealed correctly, five minutes ago
    return s.build(uid, torch.ones(2, H)).request


def unknown_session(s: SealedStub, uid):
    sent = s.build(uid, torch.ones(2, H))
    sent.request.session_id = os.urandom(16)
    return sent.request


@pytest.mark.parametrize("case", ["tampered", "wrong key", "stale", "unknown session", "replay"])
def test_bad_seals_are_refused_and_the_peer_keeps_serving(stub, uid, case, monkeypatch):
    s = SealedStub(stub)
    if case == "replay":
        request = s.build(uid, torch.ones(2, H)).request
        stub.Forward(request, timeout=10)
        want = "replayed"
    else:
        make = {"tampered": tampered, "wrong key": wrong_key, "unknown session": unknown_session}.get(case)
        request = stale(s, uid, monkeypatch) if case == "stale" else make(s, uid)
        monkeypatch.undo()
        want = {"stale": "stale", "unknown session": "unknown"}.get(case, "does not authenticate")
    code, details = refused(lambda: stub.Forward(request, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and want in details, details
    assert s.forward(uid, torch.ones(2, H)).shape == (2, H)  # the same session still works


def test_forged_and_malformed_hellos(stub, uid):
    me, mallory = Identity.generate(), Identity.generate()
    info = stub.Info(pb.InfoRequest(), timeout=5)
    hello, _ = envelope.client_hello(me, info.kx_public)
    forged = pb.SessionHello(
        client_identity=me.public,
        client_ephemeral=hello.client_ephemeral,
        timestamp_ms=hello.timestamp_ms,
        signature=mallory.sign(envelope.hello_statement(hello.client_ephemeral, info.kx_public, hello.timestamp_ms)),
    )
    code, details = refused(lambda: stub.OpenSession(forged, timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "signature" in details
    short = pb.SessionHello(client_identity=b"x", client_ephemeral=hello.client_ephemeral, timestamp_ms=1)
    assert refused(lambda: stub.OpenSession(short, timeout=5))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert SealedStub(stub).forward(uid, torch.ones(1, H)).shape == (1, H)


def test_private_peer_allowlist_and_rate_limit(swarm, tiny_checkpoint, tmp_path):
    friend = Identity.generate()
    allow = tmp_path / "clients.txt"
    allow.write_text(f"# our coordinators\n{friend.public.hex()}\n")
    proc = swarm.start_peer(
        "private",
        "--checkpoint",
        str(tiny_checkpoint),
        "--experts",
        "0:0",
        "--allow-clients",
        str(allow),
        "--rate-limit",
        "10",
        "--rate-burst",
        "64",
        *TOY,
    )
    uid = toy_model.read_manifest(tiny_checkpoint).uids()[0]
    channel = grpc.insecure_channel(proc.info["endpoint"])
    try:
        stub = pb_grpc.ExpertServiceStub(channel)
        code, _ = refused(lambda: SealedStub(stub, Identity.generate()))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        s = SealedStub(stub, friend)
        assert s.forward(uid, torch.ones(48, H)).shape == (48, H)
        code, details = refused(lambda: s.forward(uid, torch.ones(48, H)))  # 96 rows > burst 64 at 10 rows/s
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in details
    finally:
        channel.close()
        swarm.stop(proc)


def raw_get(dht: DHT, key: str) -> dict:
    found = dht.get(key, latest=True)
    return {} if found is None else {sk: v.value for sk, v in found.value.items()}


def live_subkeys(dht: DHT, key: str) -> set:
    return {sk for sk, v in raw_get(dht, key).items() if not (isinstance(v, dict) and v.get("state") == "left")}


def test_forged_dht_records_are_refused_by_real_nodes(swarm, client, tiny_checkpoint):
    uid = toy_model.read_manifest(tiny_checkpoint).uids()[0]
    honest_subkeys = live_subkeys(client.dht, uid)  # (a LEFT tombstone of an earlier test may expire meanwhile)
    assert honest_subkeys, "the honest peer's record is visible"
    victim_owner = next(iter(honest_subkeys))
    victim = PeerRecord.from_dict(raw_get(client.dht, uid)[victim_owner])
    mallory, rsa = Identity.generate(), RSAPrivateKey()
    my_owner = RSASignatureValidator(rsa).local_public_key
    fields = dict(endpoint="127.0.0.1:1", state=PeerState.ONLINE, load=0, throughput=1e9, device="cpu", version="evil")
    good = PeerRecord.signed(mallory, my_owner, **fields).__dict__
    forgeries = {
        "another peer's subkey": (victim_owner, PeerRecord(**good).to_dict()),
        "wrong schema": (my_owner, {"endpoint": "127.0.0.1:1", "state": "online"}),
        "unsigned": (b"plain-subkey", PeerRecord(**good).to_dict()),
        "stolen identity": (
            my_owner,
            PeerRecord(**{**good, "identity": victim.identity, "kx": victim.kx, "kx_sig": victim.kx_sig}).to_dict(),
        ),
    }
    # the attacker runs a full node that signs with its own key and checks nothing else
    attacker = DHT(
        initial_peers=swarm.initial_peers,
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        record_validators=[RSASignatureValidator(rsa)],
    )
    try:
        for name, (subkey, value) in forgeries.items():
            ok = attacker.store(uid, value, get_dht_time() + 60, subkey=subkey)
            assert not ok, f"{name}: an honest node accepted the forgery"
        client.io.run(client.swarm.refresh())
        assert live_subkeys(client.dht, uid) == honest_subkeys  # the victim's record is intact, nothing added
        assert all(r.record.version != "evil" for r in client.swarm.replicas(uid))
        assert PeerRecord.from_dict(raw_get(client.dht, uid)[victim_owner]).endpoint == victim.endpoint
    finally:
        attacker.shutdown()


def test_fuzzed_requests_all_get_a_status(swarm, tiny_checkpoint):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    proc = swarm.start_peer("fuzz", "--checkpoint", str(tiny_checkpoint), "--experts", "0:0-1", *TOY)
    uid = toy_model.read_manifest(tiny_checkpoint).uids()[0]
    channel = grpc.insecure_channel(proc.info["endpoint"])
    stub = pb_grpc.ExpertServiceStub(channel)
    sealed = SealedStub(stub)
    valid = sealed.build(uid, torch.ones(2, H)).request
    rss_before = psutil.Process(proc.pid).memory_info().rss
    codes: dict[grpc.StatusCode, int] = {}
    raw_forward = channel.unary_unary(
        "/moe_swarm.v1.ExpertService/Forward", request_serializer=None, response_deserializer=None
    )

    requests = st.builds(
        pb.ForwardRequest,
        request_id=st.text(max_size=40),
        segments=st.lists(
            st.builds(
                pb.Segment,
                expert_uid=st.sampled_from([uid, "", "x/0/0", uid + "0"]) | st.text(max_size=20),
                num_rows=st.integers(0, 2**32 - 1),
            ),
            max_size=4,
        ),
        inputs=st.builds(
            pb.Tensor,
            dtype=st.sampled_from(["float32", "bfloat16", "int8", ""]),
            shape=st.lists(st.integers(-2, 2**40), max_size=5),
            data=st.binary(max_size=600),
        ),
        session_id=st.sampled_from([b"", sealed.keys.session_id]) | st.binary(max_size=20),
        counter=st.integers(0, 2**64 - 1),
        timestamp_ms=st.integers(0, 2**64 - 1),
        deadline_ms=st.integers(0, 2**64 - 1),
    )

    def answer(call) -> None:
        try:
            call()
            codes[grpc.StatusCode.OK] = codes.get(grpc.StatusCode.OK, 0) + 1
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "the peer hung"
            codes[e.code()] = codes.get(e.code(), 0) + 1

    @settings(max_examples=3000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(requests)
    def fuzz_messages(req):
        answer(lambda: stub.Forward(req, timeout=5))

    @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=300) | st.binary(max_size=40).map(lambda b: valid.SerializeToString()[: len(b) * 4]))
    def fuzz_bytes(raw):  # not even protobuf: truncated or random bytes
        answer(lambda: raw_forward(raw, timeout=5))

    def mutants(n: int, seed: int = 0):  # byte-level mutations of a valid sealed request: reach the deep checks
        rng = random.Random(seed)
        base = valid.SerializeToString()
        for _ in range(n):
            data = bytearray(base)
            for _ in range(rng.randint(1, 8)):
                op, i = rng.random(), rng.randrange(len(data))
                if op < 0.6:
                    data[i] ^= 1 << rng.randrange(8)
                elif op < 0.8:
                    del data[i : i + rng.randint(1, 16)]
                else:
                    data[i:i] = rng.randbytes(rng.randint(1, 16))
            yield bytes(data)

    try:
        fuzz_messages()
        fuzz_bytes()
        for raw in mutants(6000):
            answer(lambda raw=raw: raw_forward(raw, timeout=5))
        assert sum(codes.values()) >= 10_000
        assert proc.alive() and sealed.forward(uid, torch.ones(2, H)).shape == (2, H)
        assert psutil.Process(proc.pid).memory_info().rss - rss_before < 64 << 20
        assert grpc.StatusCode.UNKNOWN not in codes, codes  # every refusal is a deliberate status
        assert codes.get(grpc.StatusCode.UNAUTHENTICATED, 0) > 100  # mutants reached the seal checks
    finally:
        channel.close()
        swarm.stop(proc)


def test_cheating_peer_is_caught_by_spot_checks_and_generation_is_unchanged(swarm, tmp_path, monkeypatch):
    from coordinator.dispatch import plan
    from coordinator.models.hf import checkpoint_info, load_swarm_model
    from coordinator.models.tiny import VOCAB, save_tiny_checkpoint

    # once two peers have answered, a third that has not gets work only by exploration (5% of
    # choices): 16 layer calls may never explore it. Exploring often makes sure it gets work.
    monkeypatch.setattr(plan, "EXPLORE_SHARE", 0.5)

    ckpt = save_tiny_checkpoint(tmp_path / "mx", "mixtral", seed=23)
    info = checkpoint_info(ckpt)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    want = greedy(local_model(ckpt), ids, 8)
    serve = ["--model", str(ckpt), "--experts", "*", *TOY]
    procs = swarm.start_peers({"honest-1": serve, "honest-2": serve, "cheater": [*serve, "--sim-corrupt", "0.05"]})
    cheater = procs[2].info["peer_id"]
    try:
        with SwarmClient(swarm.initial_peers, info.uids, timeout=20, spot_check=1.0) as client:
            client.wait_for_experts(timeout=60)
            model = load_swarm_model(ckpt, client, info=info)
            got = greedy(model, ids, 8)
            stats = client.dispatcher.stats
            banned = client.dispatcher.health.banned(cheater)
    finally:
        swarm.stop_many(procs)
    assert torch.equal(got, want)  # every wrong answer was replaced before it was used
    assert stats.cheaters_banned >= 1 and banned
    assert {e["wrong"]["peer_id"] for e in stats.evidence} == {cheater}
    for e in stats.evidence:  # the cheater's own signature convicts it
        w = e["wrong"]
        assert envelope.verify(
            bytes.fromhex(w["identity"]), bytes.fromhex(w["signature"]), bytes.fromhex(w["statement"])
        )
    assert stats.exact == stats.routed


def test_forgotten_session_is_reopened_without_failing_the_call(client, tiny_checkpoint):
    uids = toy_model.read_manifest(tiny_checkpoint).uids()[: TINY.num_experts]
    x, experts = torch.randn(4, H), torch.tensor([[0, 5]] * 4)
    assert client.dispatch(x, experts, uids, torch.float32).complete
    sessions = client.dispatcher.sessions._sessions
    assert len(sessions) >= 2
    for key, s in list(sessions.items()):  # as if every peer restarted or evicted us: ids they never saw
        _, bogus = envelope.client_hello(client.identity, Identity.generate().kx_public)
        sessions[key] = type(s)(bogus, s.opened_at, s.ttl_s)
    before = client.dispatcher.stats.bans, client.dispatcher.stats.retries
    assert client.dispatch(x, experts, uids, torch.float32).complete
    assert (client.dispatcher.stats.bans, client.dispatcher.stats.retries) == before  # re-keyed in place
    assert all(s.keys.session_id != b"" for s in sessions.values())


@pytest.mark.unit
def test_session_table_is_bounded_and_forgets_idle_sessions():
    from peer.sessions import SessionTable

    peer = Identity.generate()

    def keys():
        return envelope.accept_hello(peer, envelope.client_hello(Identity.generate(), peer.kx_public)[0])

    table = SessionTable(max_sessions=3, ttl_s=60)
    first = keys()
    table.add(first, b"c")
    for _ in range(3):
        table.add(keys(), b"c")
    assert len(table) == 3 and table.get(first.session_id) is None  # oldest evicted
    idle = SessionTable(ttl_s=0.05)
    k = keys()
    idle.add(k, b"c")
    assert idle.get(k.session_id) is not None
    time.sleep(0.1)
    assert idle.get(k.session_id) is None  # expired after being idle
