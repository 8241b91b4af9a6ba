"""Receipts that do not verify: a sealed answer is used (the session proved who sent it) and its
peer is banned once the verifier thread has checked it; a plaintext answer is refused and
retried elsewhere."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from .test_stream import _in_a_fresh_process, _in_process_peer


def _liar_scenario() -> dict[str, object]:
    from coordinator.dispatch.dispatcher import Dispatcher
    from coordinator.dispatch.swarm import Replica
    from coordinator.dispatch.transport import Channels, Sessions
    from protos.envelope import Identity
    from protos.records import PeerRecord, PeerState

    class View:
        """Stands in for the DHT-backed swarm view: these replicas serve every expert."""

        def __init__(self, replicas: list[Replica]) -> None:
            self.live = replicas

        def replicas(self, uid: str) -> list[Replica]:
            return list(self.live)

        async def refresh_if_older(self, age_s: float) -> bool:
            return False

    def replica(identity: Identity, endpoint: str) -> Replica:
        record = PeerRecord(
            endpoint=endpoint,
            state=PeerState.ONLINE,
            load=0,
            throughput=1000.0,
            device="cpu",
            version="t",
            identity=identity.public,
            kx=identity.kx_public,
        )
        return Replica(record.peer_id, record, float("inf"))

    async def scenario() -> dict[str, object]:
        liar_identity, forger = Identity.generate(), Identity.generate()
        liar_identity.sign = forger.sign  # receipts signed by a key other than the one announced
        honest_identity = Identity.generate()
        liar_server, liar_endpoint, liar = await _in_process_peer(identity=liar_identity)
        honest_server, honest_endpoint, honest = await _in_process_peer(identity=honest_identity)
        liar_replica, honest_replica = replica(liar_identity, liar_endpoint), replica(honest_identity, honest_endpoint)
        uids = liar.experts.uids  # both peers host the same seeded experts
        x = torch.randn(5, liar.experts.hidden_dim, generator=torch.Generator().manual_seed(3))
        experts = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1]])
        channels = Channels()
        seen: dict[str, object] = {}
        try:
            sealed_to = Sessions(Identity.generate(), channels)
            d = Dispatcher(View([honest_replica]), channels, 10, hedge=False, sessions=sealed_to)
            reference = await d.dispatch(x, experts, uids, torch.float32)
            # sealed: the answer is used, its receipt checked once the call has returned
            d = Dispatcher(View([liar_replica]), channels, 10, hedge=False, sessions=sealed_to)
            result = await d.dispatch(x, experts, uids, torch.float32)
            seen["sealed_equal"] = torch.equal(result.outputs, reference.outputs)
            seen["sealed_banned_at_return"] = d.health.banned(liar_replica.peer_id)
            for _ in range(200):  # the verifier thread's check, within 2 s even on a loaded machine
                await asyncio.sleep(0.01)
                if d.health.banned(liar_replica.peer_id):
                    break
            seen["sealed_banned_after"] = d.health.banned(liar_replica.peer_id)
            seen["sealed_bad_receipts"] = d.stats.bad_receipts
            # plaintext: the signature is the only proof of origin, so the call fails and is retried
            d = Dispatcher(View([liar_replica, honest_replica]), channels, 10, hedge=False)
            d.health.get(honest_replica.peer_id).observe(1000.0)  # the liar looks faster: tried first
            d.health.get(liar_replica.peer_id).observe(1.0)  # (and has answered before, as the honest one)
            result = await d.dispatch(x, experts, uids, torch.float32)
            seen["plain_equal"] = torch.equal(result.outputs, reference.outputs)
            seen["plain_banned"] = d.health.banned(liar_replica.peer_id)
            seen["plain_answered_by"] = dict(d.stats.rpcs_by_peer)
            seen["plain_retries"] = d.stats.retries
            seen["honest"] = honest_replica.peer_id
        finally:
            await channels.close()
            for server, servicer in ((liar_server, liar), (honest_server, honest)):
                await server.stop(None)
                servicer.close()
        return seen

    return asyncio.run(scenario())


def test_bad_receipts_ban_the_peer_sealed_after_the_call_plaintext_before_use():
    seen = _in_a_fresh_process(_liar_scenario)
    assert seen["sealed_equal"]  # the liar's outputs are right; only its evidence is not
    assert not seen["sealed_banned_at_return"]  # checked off the layer call's critical path...
    assert seen["sealed_banned_after"] and seen["sealed_bad_receipts"] == 1  # ...but checked
    assert seen["plain_equal"]
    assert seen["plain_banned"] and seen["plain_retries"] == 2  # both experts went elsewhere
    assert seen["plain_answered_by"] == {seen["honest"]: 1}


class _Proof:
    """A proof whose receipt check takes a moment and may fail (pure logic: no keys involved)."""

    def __init__(self, peer_id: str, good: bool, checked: list[str]) -> None:
        self.peer_id, self.good, self.checked = peer_id, good, checked

    def receipt(self) -> None:
        from protos.envelope import EnvelopeError

        time.sleep(0.001)
        self.checked.append(self.peer_id)
        if not self.good:
            raise EnvelopeError("forged")


@pytest.mark.unit
def test_receipts_are_checked_off_the_loop_with_a_bounded_backlog():
    """Every receipt is checked, by the verifier thread; bad ones ban their peer on the loop's
    thread; a backlog past MAX_UNCHECKED is checked by the loop itself, so it never grows past it."""
    from coordinator.dispatch import verify
    from coordinator.dispatch.health import HealthCache
    from coordinator.dispatch.stats import DispatchStats

    async def scenario() -> tuple[DispatchStats, HealthCache, list[str], int, int]:
        health, stats, checked = HealthCache(), DispatchStats(), []
        receipts = verify.DeferredReceipts(health, stats)
        loop_thread, punish = [], receipts.punish

        def on_the_loop(item, error) -> None:
            loop_thread.append(asyncio.get_running_loop())  # raises off the loop's thread
            punish(item, error)

        receipts.punish = on_the_loop
        for i in range(verify.MAX_UNCHECKED + 20):  # nobody verifies yet: the loop takes on the excess
            receipts.add(_Proof(f"p{i % 4}", good=i % 4 != 3, checked=checked))
        most = len(receipts.pending)
        inline = len(checked)
        receipts.check_later()
        for _ in range(1000):
            await asyncio.sleep(0.01)
            if not receipts.pending and len(checked) == verify.MAX_UNCHECKED + 20:
                break
        await asyncio.sleep(0.05)  # the punishments the verifier handed to the loop
        assert len(loop_thread) == stats.bad_receipts  # each punished on the loop
        return stats, health, checked, most, inline

    stats, health, checked, most, inline = asyncio.run(scenario())
    assert most == verify.MAX_UNCHECKED and inline == 20
    assert sorted(checked) == sorted(f"p{i % 4}" for i in range(verify.MAX_UNCHECKED + 20))
    assert stats.bad_receipts == (verify.MAX_UNCHECKED + 20) // 4 and health.banned("p3")
    assert not any(health.banned(p) for p in ("p0", "p1", "p2"))
