"""Spot checks that decide, against real peer processes that cheat with correctly signed receipts.

One toy checkpoint of our own (its own model id, so the session swarm's peers never mix in):
layer 0 has two replicas, one honest and one cheater; layer 1 has four, two honest and two
colluders that corrupt alike (so they agree with each other). The cheaters are real
`moe-peer serve` processes with `--sim-corrupt`, signing their wrong outputs as if honest.
"""

from __future__ import annotations

import base64
import json

import pytest
import torch

from coordinator.client import SwarmClient
from coordinator.dispatch.referee import ToyReferee
from protos import envelope, tensors, toy_model

from .conftest import TINY

H = TINY.hidden_dim
TOY = ["--threads", "1", "--announce-period", "2"]
CORRUPT = ["--sim-corrupt", "0.05"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("trust") / "ckpt"
    toy_model.save_checkpoint(path, TINY, seed=101)
    return path


@pytest.fixture(scope="module")
def peers(swarm, ckpt):
    layer0 = ["--checkpoint", str(ckpt), "--experts", "0:*", *TOY]
    layer1 = ["--checkpoint", str(ckpt), "--experts", "1:*", *TOY]
    specs = {
        "l0-honest": layer0,
        "l0-cheater": [*layer0, *CORRUPT],
        "l1-honest-1": layer1,
        "l1-honest-2": layer1,
        "l1-colluder-1": [*layer1, *CORRUPT],
        "l1-colluder-2": [*layer1, *CORRUPT],
    }
    procs = swarm.start_peers(specs)
    yield {p.name: p.info["peer_id"] for p in procs}
    swarm.stop_many(procs)


def uids_of(ckpt, layer: int) -> list[str]:
    return toy_model.read_manifest(ckpt).uids()[layer * TINY.num_experts : (layer + 1) * TINY.num_experts]


def reference(ckpt, layer: int, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """[T, k, H]: each (token, slot)'s expert computed locally from the checkpoint's weights."""
    out = torch.empty(*experts.shape, H)
    for e in experts.unique().tolist():
        names = [toy_model.expert_key(layer, e, p) for p in toy_model.EXPERT_PARAMS]
        w = toy_model.read_tensors(ckpt, names)
        mask = experts == e
        rows = x.unsqueeze(1).expand(-1, experts.shape[1], -1)[mask]
        out[mask] = toy_model.swiglu_expert(rows, *(w[n] for n in names))
    return out


def check_evidence(item: dict, ckpt) -> None:
    """What a third party does with a conviction: the signature, the digests of the kept
    plaintexts, and a recomputation showing the signed output is wrong."""
    wrong = item["wrong"]
    statement = bytes.fromhex(wrong["statement"])
    assert envelope.verify(bytes.fromhex(wrong["identity"]), bytes.fromhex(wrong["signature"]), statement)
    request, output = base64.b64decode(wrong["request_b64"]), base64.b64decode(wrong["output_b64"])
    request_digest = envelope.digest(bytes.fromhex(wrong["request_header"]), request)
    output_digest = envelope.digest(bytes.fromhex(wrong["response_header"]), output)
    assert statement.startswith(b"moe-swarm/v1/receipt" + request_digest + output_digest)
    dtype, shape = tensors.dtype_from_name(wrong["dtype"]), tuple(wrong["shape"])
    x, y = tensors.from_bytes(request, dtype, shape), tensors.from_bytes(output, dtype, shape)
    referee, offset, differs = ToyReferee(ckpt), 0, False
    for uid, rows in wrong["segments"]:
        truth = referee(uid, x[offset : offset + rows])
        differs |= not torch.allclose(truth, y[offset : offset + rows], rtol=1e-3, atol=1e-5)
        offset += rows
    assert differs, "the evidence shows an output that is in fact right"


def calls(client: SwarmClient, uids: list[str], n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, object]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(6, H, generator=gen)
        experts = torch.stack([torch.randperm(TINY.num_experts, generator=gen)[:2] for _ in range(6)])
        out.append((x, experts, client.dispatch(x, experts, uids, torch.float32)))
    return out


def test_one_cheater_among_two_replicas_is_proven_wrong_and_never_used(swarm, ckpt, peers, tmp_path):
    uids, store = uids_of(ckpt, 0), tmp_path / "trust.json"
    cheater, honest = peers["l0-cheater"], peers["l0-honest"]
    with SwarmClient(swarm.initial_peers, uids, timeout=20, trust_store=store, referee=ToyReferee(ckpt)) as client:
        assert client.local and client.dispatcher.spot_check == 0  # a local swarm: off unless asked for
    # the default rate of a public swarm, on this (local) one
    with SwarmClient(
        swarm.initial_peers, uids, timeout=20, trust_store=store, referee=ToyReferee(ckpt), spot_check=0.05
    ) as client:
        client.wait_for_experts(timeout=60)
        done = calls(client, uids, 6, seed=1)
        stats, health = client.dispatcher.stats, client.dispatcher.health
        banned = {p: health.banned(p) for p in (cheater, honest)}
    for x, experts, result in done:
        assert result.complete
        torch.testing.assert_close(result.outputs, reference(ckpt, 0, x, experts), rtol=1e-4, atol=1e-6)
    assert banned == {cheater: True, honest: False}
    assert stats.cheaters_banned >= 1 and stats.spot_resolved_locally >= 1 and stats.spot_unresolved == 0
    assert {e["wrong"]["peer_id"] for e in stats.evidence} == {cheater}
    assert stats.exact == stats.routed
    for item in stats.evidence:
        check_evidence(item, ckpt)
    # the ban and the evidence outlive the process: a new coordinator starts with the cheater banned
    saved = json.loads(store.read_text())["peers"]
    assert saved[cheater]["banned_until"] > 0 and saved[cheater]["convicted"] >= 1
    assert saved.get(honest, {}).get("convicted", 0) == 0
    kept = list((tmp_path / "evidence").glob("*.json"))
    assert kept and all(json.loads(f.read_text())["wrong"]["peer_id"] == cheater for f in kept)
    with SwarmClient(swarm.initial_peers, uids, timeout=20, trust_store=store, spot_check=0) as again:
        assert again.dispatcher.health.banned(cheater) and again.dispatcher.stats.banned_at_start == 1
        again.wait_for_experts(timeout=60)
        calls(again, uids, 2, seed=2)
        assert set(again.dispatcher.stats.rpcs_by_peer) == {honest}


def test_two_replicas_without_a_referee_never_use_a_disputed_answer(swarm, ckpt, peers, tmp_path):
    uids = uids_of(ckpt, 0)
    with SwarmClient(swarm.initial_peers, uids, timeout=20, spot_check=1.0, fallback="drop") as client:
        client.wait_for_experts(timeout=60)
        done = calls(client, uids, 4, seed=3)
        stats = client.dispatcher.stats
    assert stats.spot_unresolved >= 1 and stats.cheaters_banned == 0  # a 1:1 dispute proves nothing
    for x, experts, result in done:
        want = reference(ckpt, 0, x, experts)
        ok = result.answered
        # every answer used is right; the disputed ones were dropped and counted
        torch.testing.assert_close(result.outputs[ok], want[ok], rtol=1e-4, atol=1e-6)
    assert stats.dropped > 0 and stats.exact + stats.dropped == stats.routed


def test_two_colluders_among_four_never_get_an_honest_peer_banned(swarm, ckpt, peers, tmp_path):
    uids = uids_of(ckpt, 1)
    honest = {peers["l1-honest-1"], peers["l1-honest-2"]}
    colluders = {peers["l1-colluder-1"], peers["l1-colluder-2"]}
    with SwarmClient(
        swarm.initial_peers, uids, timeout=20, spot_check=1.0, fallback="drop", trust_store=tmp_path / "t.json"
    ) as client:
        health = client.dispatcher.health
        for p in colluders:  # they look fast and have answered before: they answer first
            health.get(p).observe(0.1)
        for p in honest:
            health.get(p).observe(1000.0)
        client.wait_for_experts(timeout=60)
        calls(client, uids, 8, seed=4)
        stats, health, trust = client.dispatcher.stats, client.dispatcher.health, client.dispatcher.trust
        banned = {p for p in honest | colluders if health.banned(p)}
    assert not banned & honest
    assert not {e["wrong"]["peer_id"] for e in stats.evidence} & honest
    assert all(trust.peers.get(p) is None or trust.peers[p].convicted == 0 for p in honest)
    # checked, though not necessarily caught: two colluders who happen to verify each other agree
    # (docs/security.md says so); what must hold is that no honest peer pays for it
    assert stats.spot_checks > 0


def test_honest_peers_are_never_banned(swarm, ckpt, peers):
    uids = uids_of(ckpt, 1)
    honest = [peers["l1-honest-1"], peers["l1-honest-2"]]
    with SwarmClient(swarm.initial_peers, uids, timeout=20, spot_check=1.0) as client:
        for p in (peers["l1-colluder-1"], peers["l1-colluder-2"]):  # only the honest two remain
            client.dispatcher.health.ban(p, 3600)
        client.wait_for_experts(timeout=60)
        done = calls(client, uids, 8, seed=5)
        stats, health = client.dispatcher.stats, client.dispatcher.health
        banned = [p for p in honest if health.banned(p)]
    assert not banned and stats.cheaters_banned == 0 and stats.spot_unresolved == 0
    assert stats.spot_checks > 0 and stats.exact == stats.routed
    for x, experts, result in done:
        torch.testing.assert_close(result.outputs, reference(ckpt, 1, x, experts), rtol=1e-4, atol=1e-6)
