"""Spot checks that decide: a sampled answer is recomputed by an independent replica, and a
disagreement is settled by proof or the disputed answer is not used.

Sampling: each answered expert is checked with probability max(fraction, 1 / (1 + history)),
history being the peer's answers a check confirmed (persisted in the trust store), so a peer
this coordinator has never verified is checked on its first answer, half its second, ...
and one with a record at the base `fraction`.

Verifier: another replica of the expert run by another operator (not the same identity, X25519
key or endpoint; not the same host either in a public swarm), the one with the longest
verified history preferred.

A dispute is settled, in this order:
1. by the coordinator recomputing the expert (a `Referee`, when it holds the weights): every
   answer that differs from its result is proven wrong;
2. else by polling further independent replicas (up to MAX_VOTES answers in all): a side
   with a strict majority of at least two votes wins, the others are convicted;
3. else (a tie, or nobody else to ask) the dispute is unresolved: the disputed answer is
   dropped and the expert goes to the fallback policy, counted, never used as exact.
A convicted peer is banned for CHEATER_BAN_S (persisted), and its signed receipt, with the
headers and plaintexts it commits to, is kept as evidence.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

import torch

from coordinator.dispatch.health import HealthCache
from coordinator.dispatch.referee import Referee
from coordinator.dispatch.stats import DispatchStats
from coordinator.dispatch.swarm import Replica
from coordinator.dispatch.trust import TrustStore
from coordinator.dispatch.verify import DeferredReceipts, Proof
from protos.endpoints import parse_endpoint
from protos.envelope import EnvelopeError

if TYPE_CHECKING:
    from coordinator.dispatch.layer_call import LayerCall

log = logging.getLogger(__name__)

CHEATER_BAN_S = 3600.0  # a peer proven wrong by its own receipt
MAX_VOTES = 5  # answers gathered for one disputed expert (the first two included)
# relative difference two honest replicas may show (GEMM blocking varies with batch composition)
SPOT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DEFAULT_SPOT_CHECK = 0.05  # the base rate; unverified peers are checked more (see the module doc)


def same_operator(a: Replica, b: Replica, local: bool) -> bool:
    """Could one operator run both? Same identity, same X25519 key, same endpoint, or (in a
    public swarm, where hosts mean something) the same host."""
    ra, rb = a.record, b.record
    if a.peer_id == b.peer_id or ra.kx == rb.kx or ra.endpoint == rb.endpoint:
        return True
    return not local and parse_endpoint(ra.endpoint)[0] == parse_endpoint(rb.endpoint)[0]


class SpotChecks:
    def __init__(
        self,
        fraction: float,
        tolerance: float | None,
        rng: random.Random,
        health: HealthCache,
        stats: DispatchStats,
        trust: TrustStore,
        receipts: DeferredReceipts,
        referee: Referee | None = None,
    ) -> None:
        self.fraction = fraction
        self.tolerance = tolerance
        self.rng = rng
        self.health, self.stats, self.trust, self.receipts = health, stats, trust, receipts
        self.referee = referee
        self.local = True  # whether loopback/private hosts may be distinct operators (set by the dispatcher)
        self.convicted: set[str] = set()  # peers this dispatcher proved wrong (one ban each in the counts)

    def rate(self, peer: str) -> float:
        return max(self.fraction, 1.0 / (1 + self.trust.history(peer)))

    async def check(self, first: LayerCall) -> None:
        """Verify a sample of `first`'s answers; wrong ones are replaced, unsettled ones removed."""
        work, answers, proofs = first.work, first.answers, first.proofs
        sampled = {e: work[e] for e in answers if self.rng.random() < self.rate(proofs[e].peer_id)}
        if not sampled:
            return
        second = await first.round(sampled, {e: self.others_of(first, e, [proofs[e]]) for e in sampled}, verify=True)
        self.stats.record_spot_checks(len(second.answers))
        self.stats.record_spot_unverified(len(sampled) - len(second.answers))
        disputed = []
        for e, answer in second.answers.items():
            if self.agree(answers[e], answer):
                self.trust.agreed(proofs[e].peer_id)
                self.trust.agreed(second.proofs[e].peer_id)
            else:
                disputed.append(e)
        await asyncio.gather(
            *(self.settle(e, first, [(answers[e], proofs[e]), (second.answers[e], second.proofs[e])]) for e in disputed)
        )

    def others_of(self, first: LayerCall, e: int, proofs: list[Proof]) -> set[str]:
        """Peers that must not check expert `e`: those in `proofs` and any replica one of their operators may run."""
        replicas = first.dispatcher.swarm.replicas(first.uids[e])
        out = {p.peer_id for p in proofs}
        out.update(r.peer_id for r in replicas for p in proofs if same_operator(r, p.replica, self.local))
        return out

    async def settle(self, e: int, first: LayerCall, votes: list[tuple[torch.Tensor, Proof]]) -> None:
        """Expert `e`'s answers disagree: decide by recomputing, by majority, or not at all."""
        votes = [v for v in votes if self._receipt_ok(v[1])]
        rows = first.x.index_select(0, torch.from_numpy(first.work[e] % first.x.shape[0])).to(first.dtype)
        truth = await self._recompute(first.uids[e], rows)
        if truth is not None:
            self.stats.record_spot_resolved_locally()
            right = [v for v in votes if self.agree(v[0], truth)]
            wrong = [v for v in votes if not any(v is r for r in right)]
            self._verdict(e, first, right[0] if right else (truth, None), wrong)
            return
        while len(votes) < MAX_VOTES:
            more = await first.round({e: first.work[e]}, {e: self.others_of(first, e, [p for _, p in votes])})
            if e not in more.answers:
                break
            if self._receipt_ok(more.proofs[e]):
                votes.append((more.answers[e], more.proofs[e]))
        sides = self._sides(votes)
        best = max(sides, key=len)
        # a majority of the expert's replicas, not only of those that answered: two colluders
        # among four replicas must not outvote an honest one whose second vote came too late
        replicas = max(len(first.dispatcher.swarm.replicas(first.uids[e])), len(votes))
        if len(best) >= 2 and 2 * len(best) > replicas and all(len(s) < len(best) for s in sides if s is not best):
            self._verdict(e, first, best[0], [v for s in sides if s is not best for v in s])
            return
        self.stats.record_spot_unresolved()
        for _, proof in votes:
            self.trust.disputed(proof.peer_id)
        first.answers.pop(e, None)
        first.proofs.pop(e, None)
        first.disputed.add(e)
        log.warning("spot check of %s unresolved (%s); its answer is not used", first.uids[e], [len(s) for s in sides])

    def _sides(self, votes: list[tuple[torch.Tensor, Proof]]) -> list[list[tuple[torch.Tensor, Proof]]]:
        """Votes grouped by agreement with each group's first answer."""
        sides: list[list[tuple[torch.Tensor, Proof]]] = []
        for vote in votes:
            side = next((s for s in sides if self.agree(s[0][0], vote[0])), None)
            if side is None:
                sides.append([vote])
            else:
                side.append(vote)
        return sides or [[]]

    def _verdict(
        self,
        e: int,
        first: LayerCall,
        right: tuple[torch.Tensor, Proof | None],
        wrong: list[tuple[torch.Tensor, Proof]],
    ) -> None:
        """Use the right answer, convict the wrong ones' peers with their own receipts as evidence."""
        uid = first.uids[e]
        first.answers[e] = right[0]
        if right[1] is not None:
            first.proofs[e] = right[1]
            self.trust.agreed(right[1].peer_id)
        witness = right[1].evidence() if right[1] is not None else {"recomputed_by": "coordinator"}
        for _, proof in wrong:
            evidence = {"expert": uid, "wrong": proof.evidence(), "agreeing": [witness]}
            first_time = proof.peer_id not in self.convicted
            self.convicted.add(proof.peer_id)
            self.health.ban(proof.peer_id, CHEATER_BAN_S)
            self.trust.convict(proof.peer_id, CHEATER_BAN_S, evidence)
            self.stats.record_cheater(evidence, first_time)
            if first_time:
                log.warning("peer %s returned a wrong output for %s; banned %.0fs", proof.peer_id, uid, CHEATER_BAN_S)

    def _receipt_ok(self, proof: Proof) -> bool:
        """A disputed answer's receipt is checked at once: it may become evidence."""
        try:
            proof.receipt()
        except EnvelopeError as error:
            self.receipts.punish(proof, error)
            return False
        return True

    async def _recompute(self, uid: str, rows: torch.Tensor) -> torch.Tensor | None:
        if self.referee is None:
            return None
        return await asyncio.get_running_loop().run_in_executor(None, self.referee, uid, rows)

    def agree(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Equal up to the last bits that batch composition may change (relative norm of the difference)."""
        tol = SPOT_TOLERANCE.get(a.dtype, 2e-2) if self.tolerance is None else self.tolerance
        a, b = a.float(), b.float()
        return bool((a - b).norm() <= tol * (b.norm() + 1e-6))
