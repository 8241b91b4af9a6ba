"""Dispatch one MoE layer's token rows to remote experts: one RPC per peer per layer.

Rows are grouped by expert, experts by the replica chosen for them, and each peer gets a
single Forward with all its segments. Outputs come back in request order and are placed
at their (token, slot) positions, so the caller combines them in the original order.

Failures never reach the user while a replica remains: one deadline covers the whole
layer call; a failed or refused call is retried on the next replica; a call slower than
the peer's observed p95 gets a hedged duplicate on another replica (first answer wins,
the other is cancelled). Experts that no replica answers in time get the fallback policy
(reroute / drop / error), and every (token, slot) is counted exact, rerouted or dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from coordinator.dispatch.health import HealthCache
from coordinator.dispatch.swarm import Replica, SwarmView
from coordinator.dispatch.transport import Channels, Sessions
from protos import envelope, sealed, tensors
from protos import expert_service_pb2 as pb
from protos.envelope import EnvelopeError
from protos.records import parse_expert_uid

log = logging.getLogger(__name__)


class DispatchError(RuntimeError):
    """A layer call could not be completed; the message names the experts and peers."""


class ExpertUnavailableError(DispatchError):
    pass


FALLBACK_POLICIES = ("reroute", "drop", "error")
CHEATER_BAN_S = 3600.0  # a peer proven wrong by its own receipt
# relative difference two honest replicas may show (GEMM blocking varies with batch composition)
SPOT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
REFRESH_ON_MISS_S = 1.0  # an expert without a replica re-reads the DHT at most this often

# Router scores [T, E] (higher is better) for the reroute fallback, computed only when an
# expert could not be reached; one name for the contract every executor shares.
ScoresFn = Callable[[], torch.Tensor] | None


UNKNOWN_SESSION = "unknown or expired session"  # the peer's words when it does not know our session


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


@dataclass
class Answer:
    out: torch.Tensor
    ms: float
    receipt: Receipt | None  # None: checked after the layer call returns (see Dispatcher._exchange)


@dataclass
class Unchecked:
    """A sealed answer already used, whose receipt is checked once the layer call has returned."""

    replica: Replica
    sent: sealed.Sent
    response: pb.ForwardResponse
    plain: bytes


class RemoteExpertError(DispatchError):
    def __init__(self, message: str, code: grpc.StatusCode | None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class PeerCall:
    """The rows one peer computes in one layer call."""

    replica: Replica
    experts: list[int] = field(default_factory=list)
    segments: list[tuple[str, int]] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)  # indices into the slot-major (slot, token) list

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.segments)


@dataclass
class DispatchResult:
    outputs: torch.Tensor  # [T, k, H]; rows of slots nobody answered are zero
    answered: torch.Tensor  # [T, k] bool: False where the slot was dropped
    experts: torch.Tensor  # [T, k] the experts that computed each slot (differs where rerouted)

    @property
    def complete(self) -> bool:
        return bool(self.answered.all())


@dataclass
class DispatchStats:
    """Counters over the life of a dispatcher; every routed (token, slot) is counted."""

    layer_calls: int = 0
    rpcs: int = 0
    routed: int = 0
    exact: int = 0
    rerouted: int = 0
    dropped: int = 0
    retries: int = 0  # experts re-sent after a failed or refused call
    hedges: int = 0  # duplicate calls sent because the first was slower than its peer's p95
    bans: int = 0
    refusals: int = 0  # RESOURCE_EXHAUSTED answers (peer overloaded): retried elsewhere, no ban
    bad_receipts: int = 0  # answers whose receipt did not verify (the peer is banned)
    spot_checks: int = 0  # experts recomputed on a second replica to verify the first
    spot_unresolved: int = 0  # disagreements no third replica could settle
    cheaters_banned: int = 0
    evidence: list[dict] = field(default_factory=list)  # signed receipts of each proven-wrong answer
    rpc_ms: list[float] = field(default_factory=list)
    layer_ms: dict[int, list[float]] = field(default_factory=dict)  # whole layer calls, by layer
    peer_compute_ms: list[float] = field(default_factory=list)  # as reported by the peers
    rpcs_by_peer: Counter = field(default_factory=Counter)
    rows_by_peer: Counter = field(default_factory=Counter)
    endpoints: dict[str, str] = field(default_factory=dict)  # peer id -> endpoint it was reached at


def group_by_expert(flat_experts: np.ndarray) -> dict[int, np.ndarray]:
    """expert -> its positions in `flat_experts`, ascending (stable).

    Index bookkeeping is numpy: its small ops cost a fraction of torch's, and on a coordinator
    whose caches the peers' compute keeps flushing, every op on the path to the wire counts."""
    order = np.argsort(flat_experts, kind="stable")
    ends = np.cumsum(np.bincount(flat_experts)).tolist()
    groups, start = {}, 0
    for expert, end in enumerate(ends):
        if end > start:
            groups[expert] = order[start:end]
        start = end
    return groups


class Dispatcher:
    def __init__(
        self,
        swarm: SwarmView,
        channels: Channels,
        timeout: float = 30.0,
        *,
        fallback: str = "error",
        hedge: bool = True,
        hedge_default_ms: float = 250.0,
        hedge_min_ms: float = 5.0,
        health: HealthCache | None = None,
        sessions: Sessions | None = None,
        spot_check: float = 0.0,
        spot_tolerance: float | None = None,
        seed: int | None = None,
    ) -> None:
        if fallback not in FALLBACK_POLICIES:
            raise ValueError(f"fallback must be one of {FALLBACK_POLICIES}, got {fallback!r}")
        self.swarm = swarm
        self.channels = channels
        self.timeout = timeout  # one deadline for a whole layer call: lookups, retries, hedges
        self.fallback = fallback
        self.hedge = hedge
        self.hedge_default_ms = hedge_default_ms
        self.hedge_min_ms = hedge_min_ms
        self.health = health or HealthCache()
        self.sessions = sessions  # None: plaintext requests (peers must run --allow-plaintext)
        if not 0.0 <= spot_check <= 1.0:
            raise ValueError(f"spot_check is a fraction of calls in [0, 1], got {spot_check}")
        self.spot_check = spot_check
        self.spot_tolerance = spot_tolerance
        self._rng = random.Random(seed)
        self.stats = DispatchStats()
        self._unchecked: list[Unchecked] = []

    # ---- choosing replicas -------------------------------------------------------------
    def _cost_ms(self, replica: Replica) -> float:
        """Expected latency: observed round trip + queued rows / announced throughput."""
        health = self.health.get(replica.peer_id)
        queued = replica.record.load + health.inflight_rows
        per_row_ms = 1000.0 / replica.record.throughput if replica.record.throughput > 0 else 0.01
        return self.health.expected_ms(replica.peer_id, default_ms=1.0) + queued * per_row_ms

    def choose(self, uid: str, already: dict[str, PeerCall], exclude: set[str] = frozenset()) -> Replica | None:
        replicas = [
            r for r in self.swarm.replicas(uid) if r.peer_id not in exclude and not self.health.banned(r.peer_id)
        ]
        if not replicas:
            return None
        if len(replicas) == 1:
            return replicas[0]
        in_call = [r for r in replicas if r.peer_id in already]
        if in_call:  # fewer RPCs: one per peer per layer
            return in_call[0] if len(in_call) == 1 else min(in_call, key=self._cost_ms)
        # two random choices: close to the best, without every coordinator herding onto it
        return min(self._rng.sample(replicas, 2), key=self._cost_ms)

    def plan(
        self, work: dict[int, np.ndarray], uids: list[str], exclude: dict[int, set[str]] | None = None
    ) -> tuple[list[PeerCall], list[int]]:
        """Assign each expert's positions to a replica; returns the calls and the experts without one."""
        exclude = exclude or {}
        calls: dict[str, PeerCall] = {}
        missing = []
        for expert in sorted(work):
            replica = self.choose(uids[expert], calls, exclude.get(expert, set()))
            if replica is None:
                missing.append(expert)
                continue
            call = calls.setdefault(replica.peer_id, PeerCall(replica))
            call.experts.append(expert)
            call.segments.append((uids[expert], len(work[expert])))
            call.positions.append(work[expert])
        return list(calls.values()), missing

    # ---- one RPC ------------------------------------------------------------------------
    async def _call(self, call: PeerCall, x: torch.Tensor, dtype: torch.dtype, deadline: float) -> Answer:
        positions = call.positions[0] if len(call.positions) == 1 else np.concatenate(call.positions)
        rows = x.index_select(0, torch.from_numpy(positions % x.shape[0])).to(dtype)
        replica = call.replica
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            for attempt in range(2):
                try:
                    return await self._exchange(call, rows, max(deadline - loop.time(), 1e-3), started)
                except grpc.aio.AioRpcError as e:
                    forgotten = e.code() == grpc.StatusCode.UNAUTHENTICATED and UNKNOWN_SESSION in (e.details() or "")
                    if attempt or not forgotten or self.sessions is None:
                        raise
                    # the peer restarted or evicted our session: open a new one, once
                    self.sessions.forget(replica.record.endpoint, replica.record.kx)
        except grpc.aio.AioRpcError as e:
            uids = ", ".join(u for u, _ in call.segments)
            raise RemoteExpertError(
                f"peer {replica.peer_id} at {replica.record.endpoint} failed experts [{uids}]: "
                f"{e.code().name}: {e.details()}",
                e.code(),
            ) from None
        except (EnvelopeError, tensors.TensorCodecError) as e:
            raise RemoteExpertError(f"peer {replica.peer_id} at {replica.record.endpoint}: {e}", None) from None
        raise AssertionError("unreachable")

    async def _exchange(self, call: PeerCall, rows: torch.Tensor, timeout: float, started: float) -> Answer:
        """Send one Forward (sealed when we have sessions), open and check the answer and its receipt."""
        replica = call.replica
        keys, counter = None, 0
        if self.sessions is not None:
            session = await self.sessions.get(replica.record.endpoint, replica.record.kx, timeout)
            keys, counter = session.keys, next(session.counters)
        sent = sealed.build_request(call.segments, rows, timeout, keys, counter)
        loop = asyncio.get_running_loop()
        written = loop.create_future()
        rpc = asyncio.ensure_future(
            self.channels.forward(replica.record.endpoint, sent.request, sent.plaintext.nbytes, timeout, written)
        )
        rpc.add_done_callback(lambda _: written.done() or written.set_result(None))  # failed before writing
        try:
            await written
            # what checking the answer needs from the request is computed while the request
            # travels and the peer works: a small request's digest here, a big one's on a
            # thread (BLAKE3 releases the GIL on large inputs)
            sent.response_header  # noqa: B018 (computed and cached)
            if sent.plaintext.nbytes < envelope.DIGEST_OFFLOAD_BYTES:
                sent.digest  # noqa: B018
                response = await rpc
            else:
                digest = loop.run_in_executor(None, envelope.digest, sent.header, sent.plaintext)
                try:
                    response = await rpc
                finally:
                    sent.digest = await digest
        except asyncio.CancelledError:
            rpc.cancel()  # a hedge lost or the deadline passed, maybe before the call was awaited
            raise
        ms = (time.perf_counter() - started) * 1e3
        out, plain = sealed.open_payload(sent, response)
        self.stats.peer_compute_ms.append(response.compute_ms)
        if self.sessions is not None and self.spot_check == 0:
            # the session already proved who answered (only that peer holds its keys); the
            # receipt is evidence for later disputes, and its check (an output digest and a
            # signature verification) is kept off the layer call's critical path
            self._unchecked.append(Unchecked(replica, sent, response, plain))
            return Answer(out, ms, None)
        # plaintext (the signature is the only proof of origin) or spot checks (receipts may
        # become evidence): checked before the answer is used; a bad one fails the call
        return Answer(out, ms, self._receipt(replica, sent, response, plain))

    @staticmethod
    def _receipt(replica: Replica, sent: sealed.Sent, response: pb.ForwardResponse, plain: bytes) -> Receipt:
        statement = sealed.check_receipt(sent, response, plain, replica.record.identity)
        return Receipt(replica.peer_id, replica.record.identity, statement, response.receipt)

    def _check_later(self) -> None:
        """Check the receipts of answers used so far once the running layer call has returned:
        this hop queues the check behind the call's completion callbacks, which hand its
        result to the caller's thread."""
        if self._unchecked:
            unchecked, self._unchecked = self._unchecked, []
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._check_receipts, unchecked)

    def _check_receipts(self, unchecked: list[Unchecked]) -> None:
        for item in unchecked:
            try:
                self._receipt(item.replica, item.sent, item.response, item.plain)
            except EnvelopeError as e:
                peer = item.replica.peer_id
                self.health.fail(peer)
                self.stats.bans += 1
                self.stats.bad_receipts += 1
                log.warning("peer %s answered with a receipt that does not verify (%s); banned", peer, e)

    # ---- a layer call -------------------------------------------------------------------
    async def dispatch(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        uids: list[str],
        dtype: torch.dtype,
        scores: ScoresFn = None,
    ) -> DispatchResult:
        """x [T, H], experts [T, k] -> outputs [T, k, H] (row t, slot j = expert experts[t, j] of x[t]).

        Each expert's rows are sent slot-major ((slot, token) order), the order in which
        transformers' eager MoE gathers them, so a peer runs the very GEMM a local model would.
        `scores()` gives router scores [T, E] (higher is better) for the `reroute` fallback;
        it is only called when some expert could not be reached.
        """
        try:
            return await self._dispatch(x, experts, uids, dtype, scores)
        finally:
            self._check_later()

    async def _dispatch(
        self, x: torch.Tensor, experts: torch.Tensor, uids: list[str], dtype: torch.dtype, scores: ScoresFn
    ) -> DispatchResult:
        started = time.perf_counter()
        num_tokens, k = experts.shape
        flat = experts.T.reshape(-1).numpy().copy()  # slot-major; a copy the reroute may edit
        work = group_by_expert(flat)
        answers, tried, receipts = await self._solve(work, x, uids, dtype)
        if self.spot_check > 0:
            await self._spot_check(work, answers, receipts, x, uids, dtype)
        missing = [e for e in work if e not in answers]
        if missing and self.fallback == "error":
            detail = "; ".join(f"{uids[e]} (peers tried: {sorted(tried[e]) or 'none live'})" for e in missing)
            raise ExpertUnavailableError(f"no replica answered within the {self.timeout:g}s deadline for: {detail}")
        rerouted = 0
        if missing and self.fallback == "reroute" and scores is not None:
            rerouted = await self._reroute(missing, work, answers, flat, experts, x, uids, dtype, scores(), tried)
        done = [e for e in work if e in answers]
        answered = np.zeros(k * num_tokens, dtype=bool)
        if done:  # one scatter for all experts (their positions are disjoint)
            positions = np.concatenate([work[e] for e in done])
            answered[positions] = True
            outputs = answers[done[0]] if len(done) == 1 else torch.cat([answers[e] for e in done])
            allocate = torch.empty if len(positions) == len(answered) else torch.zeros  # all rows written: no fill
            result = allocate(k * num_tokens, x.shape[-1], dtype=dtype)
            result.index_copy_(0, torch.from_numpy(positions), outputs.to(dtype))
        else:
            result = torch.zeros(k * num_tokens, x.shape[-1], dtype=dtype)
        dropped = len(answered) - int(answered.sum())
        self.stats.layer_calls += 1
        self.stats.routed += flat.size
        self.stats.exact += flat.size - dropped - rerouted
        self.stats.rerouted += rerouted
        self.stats.dropped += dropped
        layer = parse_expert_uid(uids[0])[1]
        self.stats.layer_ms.setdefault(layer, []).append((time.perf_counter() - started) * 1e3)
        return DispatchResult(
            result.view(k, num_tokens, -1).transpose(0, 1),
            torch.from_numpy(answered).view(k, num_tokens).T,
            torch.from_numpy(flat).view(k, num_tokens).T,
        )

    async def _spot_check(
        self,
        work: dict[int, np.ndarray],
        answers: dict[int, torch.Tensor],
        receipts: dict[int, Receipt],
        x: torch.Tensor,
        uids: list[str],
        dtype: torch.dtype,
    ) -> None:
        """Recompute a sampled fraction of experts on a second replica; on disagreement a third
        decides, the peer proven wrong by its own signed receipt is banned, and the honest
        output replaces its answer before the caller combines."""
        sampled = {e: work[e] for e in answers if self._rng.random() < self.spot_check}
        if not sampled:
            return
        second, _, second_receipts = await self._solve(
            sampled, x, uids, dtype, {e: {receipts[e].peer_id} for e in sampled}
        )
        self.stats.spot_checks += len(second)
        disputed = {e: work[e] for e in second if not self._agree(answers[e], second[e])}
        if not disputed:
            return
        third, _, third_receipts = await self._solve(
            disputed, x, uids, dtype, {e: {receipts[e].peer_id, second_receipts[e].peer_id} for e in disputed}
        )
        for e in disputed:
            first_ok = e in third and self._agree(answers[e], third[e])
            second_ok = e in third and self._agree(second[e], third[e])
            if first_ok == second_ok:  # no third replica, or it agrees with both or neither
                self.stats.spot_unresolved += 1
                log.warning("spot check of %s unresolved: replicas disagree and no majority", uids[e])
                continue
            liar, witness = (second_receipts[e], receipts[e]) if first_ok else (receipts[e], second_receipts[e])
            if second_ok:
                answers[e], receipts[e] = second[e], second_receipts[e]
            self.health.ban(liar.peer_id, CHEATER_BAN_S)
            self.stats.cheaters_banned += 1
            evidence = {
                "expert": uids[e],
                "wrong": liar.evidence(),
                "agreeing": [witness.evidence(), third_receipts[e].evidence()],
            }
            self.stats.evidence.append(evidence)
            log.warning("peer %s returned a wrong output for %s; banned. evidence: %s", liar.peer_id, uids[e], evidence)

    def _agree(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Equal up to the last bits that batch composition may change (relative norm of the difference)."""
        tol = SPOT_TOLERANCE.get(a.dtype, 2e-2) if self.spot_tolerance is None else self.spot_tolerance
        a, b = a.float(), b.float()
        return bool((a - b).norm() <= tol * (b.norm() + 1e-6))

    async def _reroute(self, missing, work, answers, flat, experts, x, uids, dtype, scores, tried) -> int:
        """Give each unanswered (token, slot) the token's best-scoring expert that is not
        already among its choices and still has a live replica; one more round, same deadline."""
        num_tokens = experts.shape[0]
        dead = set(missing)
        ranked = torch.argsort(scores.float(), dim=-1, descending=True)
        moves: dict[int, list[int]] = defaultdict(list)  # new expert -> positions
        for expert in missing:
            for pos in work.pop(expert).tolist():
                token = pos % num_tokens
                taken = set(experts[token].tolist())
                for candidate in ranked[token].tolist():
                    if candidate in taken or candidate in dead:
                        continue
                    if self.choose(uids[candidate], {}, tried.get(candidate, set())) is None:
                        dead.add(candidate)
                        continue
                    moves[candidate].append(pos)
                    break
        if not moves:
            return 0
        extra = {e: np.array(p, dtype=np.int64) for e, p in moves.items()}
        got, _, _ = await self._solve(extra, x, uids, dtype)
        done = 0
        base = max(work, default=-1) + 1
        for i, (expert, positions) in enumerate(extra.items()):
            if expert in got:  # park under a fresh key: the same expert may also hold original slots
                work[base + i], answers[base + i] = positions, got[expert]
                flat[positions] = expert
                done += len(positions)
        return done

    async def _solve(
        self,
        work: dict[int, np.ndarray],
        x: torch.Tensor,
        uids: list[str],
        dtype: torch.dtype,
        exclude: dict[int, set[str]] | None = None,
    ) -> tuple[dict[int, torch.Tensor], dict[int, set[str]], dict[int, Receipt | None]]:
        """Get every expert of `work` answered once (never by a peer in `exclude`): retries,
        hedges, one deadline. Returns the answers, the peers tried, and who answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        answers: dict[int, torch.Tensor] = {}
        receipts: dict[int, Receipt | None] = {}
        tried: dict[int, set[str]] = defaultdict(set, {e: set(p) for e, p in (exclude or {}).items()})
        inflight: dict[asyncio.Task, PeerCall] = {}
        sent_at: dict[asyncio.Task, float] = {}
        hedged: set[asyncio.Task] = set()

        def covering(expert: int) -> set[str]:
            return {c.replica.peer_id for c in inflight.values() if expert in c.experts}

        unplaced: set[int] = set()  # experts that had no replica to go to
        looked_again = False

        def launch(todo: list[int]) -> int:
            sub = {e: work[e] for e in todo}
            calls, missing = self.plan(sub, uids, {e: tried[e] | covering(e) for e in todo})
            unplaced.update(e for e in missing if not covering(e))
            for call in calls:
                task = loop.create_task(self._call(call, x, dtype, deadline))
                inflight[task], sent_at[task] = call, loop.time()
                self.health.get(call.replica.peer_id).inflight_rows += call.rows
            return len(calls)

        launch(list(work))
        try:
            while True:
                if unplaced and not inflight and not looked_again:
                    # nothing left to wait for: look at the DHT once more (rate-limited, shared
                    # by concurrent calls) in case a replica joined or our view was behind
                    looked_again = True
                    try:
                        await asyncio.wait_for(self.swarm.refresh_if_older(REFRESH_ON_MISS_S), deadline - loop.time())
                    except Exception as e:  # a failed lookup leaves it to the fallback policy
                        log.debug("DHT lookup for unplaced experts failed: %r", e)
                    todo = sorted(e for e in unplaced if e not in answers)
                    unplaced.clear()
                    launch(todo)
                if not inflight:
                    break
                now = loop.time()
                wake = deadline
                if self.hedge:
                    for task, call in inflight.items():
                        if task not in hedged:
                            delay = self.health.hedge_delay_ms(
                                call.replica.peer_id, self.hedge_default_ms, self.hedge_min_ms
                            )
                            wake = min(wake, sent_at[task] + delay / 1e3)
                done, _ = await asyncio.wait(inflight, timeout=max(wake - now, 0), return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    call = inflight.pop(task)
                    peer = call.replica.peer_id
                    self.health.get(peer).inflight_rows -= call.rows
                    error = task.exception()
                    if error is None:
                        answer = task.result()
                        out, ms = answer.out, answer.ms
                        self.health.get(peer).observe(ms)
                        self.stats.rpcs += 1
                        self.stats.rpc_ms.append(ms)
                        self.stats.rpcs_by_peer[peer] += 1
                        self.stats.rows_by_peer[peer] += out.shape[0]
                        self.stats.endpoints[peer] = call.replica.record.endpoint
                        offset = 0
                        for expert, (_, rows) in zip(call.experts, call.segments, strict=True):
                            if expert not in answers:
                                answers[expert] = out[offset : offset + rows]
                                receipts[expert] = answer.receipt
                            offset += rows
                        continue
                    if getattr(error, "code", None) == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        self.stats.refusals += 1  # overloaded, not broken: go elsewhere, no ban
                    else:
                        self.health.fail(peer)
                        self.stats.bans += 1
                    retry = [e for e in call.experts if e not in answers]
                    for expert in retry:
                        tried[expert].add(peer)
                    # counted whether a hedge already covers the expert or a new call is sent
                    self.stats.retries += len(retry)
                    retry = [e for e in retry if not covering(e)]
                    if retry:
                        launch(retry)
                if all(e in answers for e in work) or loop.time() >= deadline:
                    break
                if self.hedge:
                    now = loop.time()
                    for task, call in list(inflight.items()):
                        delay = self.health.hedge_delay_ms(
                            call.replica.peer_id, self.hedge_default_ms, self.hedge_min_ms
                        )
                        if task in hedged or now < sent_at[task] + delay / 1e3:
                            continue
                        hedged.add(task)
                        todo = [e for e in call.experts if e not in answers]
                        if todo and launch(todo):
                            self.stats.hedges += 1
        finally:
            now = loop.time()
            for task, call in inflight.items():  # losers of a hedge, or past the deadline
                task.cancel()
                health = self.health.get(call.replica.peer_id)
                health.inflight_rows -= call.rows
                health.outpaced((now - sent_at[task]) * 1e3)
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
        return answers, tried, receipts
