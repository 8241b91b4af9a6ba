"""Trust, but check: peers' signed receipts, and spot checks that recompute on other replicas."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from coordinator.dispatch import sealed
from coordinator.dispatch.health import HealthCache
from coordinator.dispatch.stats import DispatchStats
from coordinator.dispatch.swarm import Replica
from protos import expert_service_pb2 as pb
from protos.envelope import EnvelopeError

if TYPE_CHECKING:
    from coordinator.dispatch.layer_call import LayerCall

log = logging.getLogger(__name__)

CHEATER_BAN_S = 3600.0  # a peer proven wrong by its own receipt
# relative difference two honest replicas may show (GEMM blocking varies with batch composition)
SPOT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Receipt:
    """A peer's signed statement about one answer: evidence that it computed these outputs."""

    peer_id: str
    identity: bytes
    statement: bytes  # covers the request's and the output's plaintext digests, uids, model id
    signature: bytes

    def evidence(self) -> dict[str, str]:
        return {
            "peer_id": self.peer_id,
            "identity": self.identity.hex(),
            "statement": self.statement.hex(),
            "signature": self.signature.hex(),
        }


def check_receipt(replica: Replica, sent: sealed.Sent, response: pb.ForwardResponse, plain: bytes) -> Receipt:
    """The answer's receipt, verified against the identity in the replica's record (EnvelopeError if not)."""
    statement = sealed.check_receipt(sent, response, plain, replica.record.identity)
    return Receipt(replica.peer_id, replica.record.identity, statement, response.receipt)


@dataclass
class Unchecked:
    """A sealed answer already used, whose receipt is checked once the layer call has returned."""

    replica: Replica
    sent: sealed.Sent
    response: pb.ForwardResponse
    plain: bytes


class DeferredReceipts:
    """Receipts of sealed answers, checked off the layer call's critical path; a bad one bans its peer."""

    def __init__(self, health: HealthCache, stats: DispatchStats) -> None:
        self.health = health
        self.stats = stats
        self.pending: list[Unchecked] = []

    def add(self, item: Unchecked) -> None:
        self.pending.append(item)

    def check_later(self) -> None:
        """Check the receipts of answers used so far once the running layer call has returned:
        this hop queues the check behind the call's completion callbacks, which hand its
        result to the caller's thread."""
        if self.pending:
            pending, self.pending = self.pending, []
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._check, pending)

    def _check(self, pending: list[Unchecked]) -> None:
        for item in pending:
            try:
                check_receipt(item.replica, item.sent, item.response, item.plain)
            except EnvelopeError as e:
                peer = item.replica.peer_id
                self.health.fail(peer)
                self.stats.record_bad_receipt()
                log.warning("peer %s answered with a receipt that does not verify (%s); banned", peer, e)


class SpotChecks:
    """Recompute a sampled fraction of experts on a second replica; on disagreement a third
    decides, the peer proven wrong by its own signed receipt is banned, and the honest
    output replaces its answer before the caller combines."""

    def __init__(
        self,
        fraction: float,
        tolerance: float | None,
        rng: random.Random,
        health: HealthCache,
        stats: DispatchStats,
    ) -> None:
        self.fraction = fraction
        self.tolerance = tolerance
        self.rng = rng
        self.health = health
        self.stats = stats

    async def check(self, first: LayerCall) -> None:
        """Verify a sample of `first`'s answers; wrong ones are replaced in place."""
        work, answers, receipts = first.work, first.answers, first.receipts
        sampled = {e: work[e] for e in answers if self.rng.random() < self.fraction}
        if not sampled:
            return
        second = await first.round(sampled, {e: {receipts[e].peer_id} for e in sampled})
        self.stats.record_spot_checks(len(second.answers))
        disputed = {e: work[e] for e in second.answers if not self.agree(answers[e], second.answers[e])}
        if not disputed:
            return
        third = await first.round(disputed, {e: {receipts[e].peer_id, second.receipts[e].peer_id} for e in disputed})
        for e in disputed:
            self._judge(e, first, second, third)

    def _judge(self, e: int, first: LayerCall, second: LayerCall, third: LayerCall) -> None:
        """Expert `e`'s first two answers disagree: the third decides who lied, if it can."""
        uid = first.uids[e]
        first_ok = e in third.answers and self.agree(first.answers[e], third.answers[e])
        second_ok = e in third.answers and self.agree(second.answers[e], third.answers[e])
        if first_ok == second_ok:  # no third replica, or it agrees with both or neither
            self.stats.record_spot_unresolved()
            log.warning("spot check of %s unresolved: replicas disagree and no majority", uid)
            return
        ours, theirs = first.receipts[e], second.receipts[e]
        liar, witness = (theirs, ours) if first_ok else (ours, theirs)
        if second_ok:
            first.answers[e], first.receipts[e] = second.answers[e], theirs
        self.health.ban(liar.peer_id, CHEATER_BAN_S)
        evidence = {
            "expert": uid,
            "wrong": liar.evidence(),
            "agreeing": [witness.evidence(), third.receipts[e].evidence()],
        }
        self.stats.record_cheater(evidence)
        log.warning("peer %s returned a wrong output for %s; banned. evidence: %s", liar.peer_id, uid, evidence)

    def agree(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Equal up to the last bits that batch composition may change (relative norm of the difference)."""
        tol = SPOT_TOLERANCE.get(a.dtype, 2e-2) if self.tolerance is None else self.tolerance
        a, b = a.float(), b.float()
        return bool((a - b).norm() <= tol * (b.norm() + 1e-6))
