"""Peers appear in the coordinator's swarm view when they announce and vanish when they leave."""

from __future__ import annotations

import signal
import time

from protos import toy_model

from .conftest import REFRESH_PERIOD


def wait_until(predicate, timeout: float, step: float = 0.05) -> float:
    """Seconds until predicate() held; AssertionError after timeout."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"condition not met within {timeout}s"
        time.sleep(step)
    return time.monotonic() - start


def test_graceful_leave_disappears_within_one_refresh(swarm, client, tiny_checkpoint):
    uids = toy_model.read_manifest(tiny_checkpoint).uids()
    hosted = [uids[0], uids[1]]  # layer 0, experts 0 and 1: a second replica of peer-a's
    proc = swarm.start_peer(
        "peer-c", "--checkpoint", str(tiny_checkpoint), "--experts", "0:0-1", "--threads", "1", "--announce-period", "2"
    )
    peer_id = proc.info["peer_id"]

    def listed() -> bool:
        return all(peer_id in {r.peer_id for r in client.swarm.replicas(uid)} for uid in hosted)

    wait_until(listed, timeout=REFRESH_PERIOD * 3 + 2)
    assert swarm.stop(proc, signal.SIGTERM) == 0  # drained, withdrew, exited cleanly
    gone_after = wait_until(
        lambda: not any(peer_id in {r.peer_id for r in client.swarm.replicas(u)} for u in hosted), timeout=10
    )
    assert gone_after <= REFRESH_PERIOD * 1.1 + 0.5, f"still listed {gone_after:.2f}s after the peer left"
    # its tombstone does not hide the other replica
    assert client.swarm.replicas(uids[0])


def test_expert_without_replica_in_view_reads_the_dht_again_before_giving_up(swarm, tmp_path):
    # the client's background refresh is far away: only the dispatcher's on-miss lookup can find the peer
    import torch

    from coordinator.client import SwarmClient

    from .conftest import TINY

    ckpt = tmp_path / "late"
    toy_model.save_checkpoint(ckpt, TINY, seed=31)
    uids = toy_model.read_manifest(ckpt).uids()
    with SwarmClient(swarm.initial_peers, uids, refresh_period=600, timeout=20, fallback="error") as client:
        assert not client.swarm.replicas(uids[0])
        proc = swarm.start_peer("late", "--checkpoint", str(ckpt), "--experts", "0:*", "--threads", "1")
        try:
            x = torch.randn(4, TINY.hidden_dim)
            result = client.dispatch(x, torch.tensor([[0, 1]] * 4), uids[: TINY.num_experts], torch.float32)
            assert result.complete and client.dispatcher.stats.exact == 8
        finally:
            swarm.stop(proc)
