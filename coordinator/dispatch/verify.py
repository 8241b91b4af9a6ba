"""Trust, but check: the proof each answer carries (its peer's signed receipt and the
plaintexts the receipt commits to), and the deferred check of receipts. Spot checks, which
decide between replicas that disagree, live in `spot.py`."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.dispatch import sealed
from coordinator.dispatch.health import HealthCache
from coordinator.dispatch.stats import DispatchStats
from coordinator.dispatch.swarm import Replica
from protos import envelope
from protos import expert_service_pb2 as pb
from protos.envelope import EnvelopeError

log = logging.getLogger(__name__)

RECEIPT_CHECK_PERIOD_S = 0.01  # how often the verifier thread looks for receipts to check
VERIFIER_IDLE_EXIT_S = 2.0  # it leaves after this long with nothing to check (the next call starts it again)
MAX_UNCHECKED = 1024  # receipts waiting for it; past this the loop checks the oldest itself

# evidence keeps the plaintexts its receipts commit to up to this size per call (both sides
# together); a bigger call's evidence keeps the digests, headers and signatures only
EVIDENCE_PLAINTEXT_BYTES = 4 << 20


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
class Proof:
    """One answered call and what its receipt commits to: the request's header and plaintext,
    the answer's header and plaintext. Kept until the layer call's checks are done; its receipt
    is verified when first asked for (before use for plaintext answers, after the layer call
    for sealed ones, at once when a spot check disputes it)."""

    replica: Replica
    sent: sealed.Sent
    response: pb.ForwardResponse
    plain: bytes | memoryview
    _receipt: Receipt | None = field(default=None, repr=False)

    @property
    def peer_id(self) -> str:
        return self.replica.peer_id

    def receipt(self) -> Receipt:
        """The verified receipt (EnvelopeError if its signature does not verify)."""
        if self._receipt is None:
            self._receipt = check_receipt(self.replica, self.sent, self.response, self.plain)
        return self._receipt

    def evidence(self) -> dict[str, object]:
        """What a third party needs to check this answer: the signed statement, the headers and
        plaintexts it commits to (envelope.digest(header, plaintext) gives each digest in the
        statement), the segments, dtype and shape to decode them, and the signer's identity."""
        sent = self.sent
        inputs = sent.request.inputs
        out: dict[str, object] = {
            **self.receipt().evidence(),
            "endpoint": self.replica.record.endpoint,
            "segments": [[s.expert_uid, s.num_rows] for s in sent.request.segments],
            "dtype": inputs.dtype,
            "shape": list(inputs.shape),
            "request_header": sent.header.hex(),
            "request_digest": sent.digest.hex(),
            "response_header": sent.response_header.hex(),
            "output_digest": envelope.digest(sent.response_header, self.plain).hex(),
        }
        if len(sent.plaintext) + len(self.plain) <= EVIDENCE_PLAINTEXT_BYTES:
            out["request_b64"] = base64.b64encode(sent.plaintext).decode("ascii")
            out["output_b64"] = base64.b64encode(self.plain).decode("ascii")
        return out


class DeferredReceipts:
    """Receipts of sealed answers, verified on a thread of their own: an Ed25519 verification
    (~0.1 ms) releases the GIL, so neither the layer call nor the event loop waits for it. A
    bad one bans its peer, on the loop's thread (where health and stats live)."""

    def __init__(self, health: HealthCache, stats: DispatchStats) -> None:
        self.health = health
        self.stats = stats
        self.pending: deque[Proof] = deque()  # appended on the loop's thread, taken by the verifier
        self._loop: asyncio.AbstractEventLoop | None = None
        self._verifier: threading.Thread | None = None
        self._lock = threading.Lock()  # the verifier's start and exit

    def add(self, item: Proof) -> None:
        self.pending.append(item)
        if len(self.pending) > MAX_UNCHECKED:  # the verifier fell behind: check here, memory stays bounded
            self._check(self.pending.popleft(), self.punish)

    def check_later(self) -> None:
        """Have what was added checked soon (within RECEIPT_CHECK_PERIOD_S, CPU permitting)."""
        if self._verifier is None and self.pending:
            with self._lock:
                if self._verifier is None:
                    self._loop = asyncio.get_running_loop()
                    self._verifier = threading.Thread(target=self._run, name="moe-swarm-receipts", daemon=True)
                    self._verifier.start()

    def _run(self) -> None:
        """Wakes on its own clock (nobody pays a wake-up per call); leaves once idle for a while."""
        loop, idle = self._loop, 0.0
        while True:
            time.sleep(RECEIPT_CHECK_PERIOD_S)
            if not self.pending:
                idle += RECEIPT_CHECK_PERIOD_S
                with self._lock:
                    if idle >= VERIFIER_IDLE_EXIT_S and not self.pending:
                        self._verifier = None
                        return
                continue
            idle = 0.0
            while self.pending:
                self._check(self.pending.popleft(), lambda item, e: loop.call_soon_threadsafe(self.punish, item, e))

    @staticmethod
    def _check(item: Proof, punish: Callable[[Proof, EnvelopeError], None]) -> None:
        try:
            item.receipt()
        except EnvelopeError as e:
            punish(item, e)

    def punish(self, item: Proof, error: EnvelopeError) -> None:
        peer = item.peer_id
        self.health.fail(peer)
        self.stats.record_bad_receipt()
        log.warning("peer %s answered with a receipt that does not verify (%s); banned", peer, error)
