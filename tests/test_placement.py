"""Automatic placement: peers host the least-covered experts that fit their memory budget."""

from __future__ import annotations

import random

import pytest

from peer.placement import choose_experts, parse_bytes, spec_for
from protos import toy_model

from .conftest import TINY


@pytest.mark.parametrize(
    ("text", "value"), [("8GiB", 8 << 30), ("512MB", 512 * 10**6), ("1.5kib", 1536), ("1048576", 1 << 20)]
)
def test_sizes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "8 parsecs", "-1GiB"])
def test_bad_sizes_say_why(text):
    with pytest.raises(ValueError, match="bad size"):
        parse_bytes(text)


def test_least_covered_first_within_budget():
    pairs = [(0, e) for e in range(6)]
    replicas = {(0, 0): 2, (0, 1): 0, (0, 2): 1, (0, 3): 0, (0, 4): 3, (0, 5): 1}
    got = choose_experts(pairs, replicas, expert_bytes=100, budget=350, rng=random.Random(0))
    assert got == [(0, 1), (0, 3), (0, 2)] or got == [(0, 1), (0, 3), (0, 5)]
    with pytest.raises(ValueError, match="holds no expert"):
        choose_experts(pairs, replicas, expert_bytes=100, budget=99)
    assert spec_for([(0, 1), (2, 5)]) == "0:1,2:5"


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
