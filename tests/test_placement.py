"""Automatic placement: peers host the least-covered experts that fit their memory budget."""

from __future__ import annotations

import random

import pytest

from peer.placement import better_placement, choose_experts, parse_bytes, weakest_coverage
from protos import toy_model
from protos.expert_spec import format_expert_spec

from .conftest import TINY


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8GiB", 8 << 30),
        ("512MB", 512 * 10**6),
        ("1.5kib", 1536),
        ("1048576", 1 << 20),
        ("8G", 8 << 30),
        ("512m", 512 << 20),
    ],
)
def test_sizes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", "GiB", "8 parsecs", "-1GiB"])
def test_bad_sizes_say_why(text):
    with pytest.raises(ValueError, match="bad size"):
        parse_bytes(text)


@pytest.mark.unit
def test_least_covered_first_within_budget():
    pairs = [(0, e) for e in range(6)]
    replicas = {(0, 0): 2, (0, 1): 0, (0, 2): 1, (0, 3): 0, (0, 4): 3, (0, 5): 1}
    got = choose_experts(pairs, replicas, expert_bytes=100, budget=350, rng=random.Random(0))
    assert got == [(0, 1), (0, 3), (0, 2)] or got == [(0, 1), (0, 3), (0, 5)]
    with pytest.raises(ValueError, match="holds no expert"):
        choose_experts(pairs, replicas, expert_bytes=100, budget=99)
    assert format_expert_spec([(0, 1), (2, 5)]) == "0:1,2:5"


def test_three_peers_with_a_third_of_the_budget_cover_every_expert(swarm, tmp_path):
    ckpt = tmp_path / "auto"
    toy_model.save_checkpoint(ckpt, TINY, seed=13)
    manifest = toy_model.read_manifest(ckpt)
    expert_bytes = 3 * TINY.hidden_dim * TINY.ffn_dim * 4
    third = -(-TINY.num_layers * TINY.num_experts // 3)  # experts per peer, rounded up
    peers = []
    try:
        for i in range(3):  # one after another: each sees the ones before it in the DHT
            peers.append(
                swarm.start_peer(
                    f"auto-{i}",
                    "--checkpoint",
                    str(ckpt),
                    "--experts",
                    "auto",
                    "--memory-budget",
                    str(third * expert_bytes),
                    "--placement-delay",
                    "0",
                    "--threads",
                    "1",
                )
            )
        hosted = [set(p.info["experts"]) for p in peers]
    finally:
        swarm.stop_many(peers)
    assert all(len(h) == third for h in hosted)
    assert set().union(*hosted) == set(manifest.uids())


@pytest.mark.unit
def test_better_placement_needs_a_strict_gain_in_weakest_coverage():
    pairs = [(0, e) for e in range(4)]
    others = {(0, 0): 1, (0, 1): 1, (0, 2): 0, (0, 3): 0}
    # hosting the uncovered half raises the weakest coverage from 0 to 1
    assert better_placement(pairs, others, [(0, 0), (0, 1)], 1, 2) == [(0, 2), (0, 3)]
    assert better_placement(pairs, others, [(0, 2), (0, 3)], 1, 2) is None  # already the best
    # half-overlapping: moving would not raise the minimum (still 1 somewhere): stay
    assert weakest_coverage(pairs, {(0, 0): 1, (0, 1): 1, (0, 2): 1, (0, 3): 0}, [(0, 1), (0, 3)]) == 1
    assert better_placement(pairs, {(0, 0): 1, (0, 1): 1, (0, 2): 1, (0, 3): 0}, [(0, 1), (0, 3)], 1, 2) is None


def test_auto_peer_moves_off_duplicated_experts_after_draining(swarm, tmp_path):
    import signal
    import threading
    import time

    import grpc
    import torch

    from coordinator.client import SwarmClient
    from protos import expert_service_pb2 as pb
    from protos import expert_service_pb2_grpc as pb_grpc

    ckpt = tmp_path / "move"
    toy_model.save_checkpoint(ckpt, TINY, seed=17)
    uids = toy_model.read_manifest(ckpt).uids()
    half = TINY.num_layers * TINY.num_experts // 2
    expert_bytes = 3 * TINY.hidden_dim * TINY.ffn_dim * 4
    mover = swarm.start_peer(
        "mover",
        "--checkpoint",
        str(ckpt),
        "--experts",
        "auto",
        "--memory-budget",
        str(half * expert_bytes),
        "--placement-delay",
        "0",
        "--placement-check",
        "1",
        "--threads",
        "1",
        "--announce-period",
        "2",
    )
    first = sorted(mover.info["experts"])
    pairs = sorted(tuple(map(int, u.rsplit("/", 2)[1:])) for u in first)
    # a fixed peer duplicates exactly what the mover chose: the other half has no replica
    spec = format_expert_spec(pairs)
    fixed = swarm.start_peer("fixed", "--checkpoint", str(ckpt), "--experts", spec, "--threads", "1")
    channel = grpc.insecure_channel(mover.info["endpoint"])
    errors, stop = [], threading.Event()
    try:
        with SwarmClient(swarm.initial_peers, uids, timeout=20, refresh_period=1, fallback="error") as client:
            x = torch.randn(8, TINY.hidden_dim)
            layer0 = uids[: TINY.num_experts]
            covered = sorted({p[1] for p in pairs if p[0] == 0})

            def load():  # calls to experts both peers serve, through the move
                while not stop.is_set():
                    try:
                        if covered:
                            client.dispatch(x, torch.tensor([[covered[0]]] * 8), layer0, torch.float32)
                    except Exception as e:
                        errors.append(e)

            worker = threading.Thread(target=load)
            worker.start()
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                now = {e.uid for e in pb_grpc.ExpertServiceStub(channel).Info(pb.InfoRequest(), timeout=5).experts}
                if now != set(first):
                    break
                time.sleep(0.5)
            stop.set()
            worker.join(30)
            client.wait_for_experts(timeout=20)  # every expert has a replica now
    finally:
        channel.close()
        swarm.stop_many([mover, fixed], signal.SIGTERM)
    assert now == set(uids) - set(first)  # moved to exactly the uncovered half
    assert not errors
