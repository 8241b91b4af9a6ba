"""One Forward to one peer: gather its rows, seal, send, open the answer, check or defer its receipt."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from coordinator.dispatch import sealed
from coordinator.dispatch.plan import PeerCall
from coordinator.dispatch.relayed import relay_dropped
from coordinator.dispatch.result import RemoteExpertError
from coordinator.dispatch.stats import DispatchStats
from coordinator.dispatch.transport import Channels, Sessions
from coordinator.dispatch.verify import DeferredReceipts, Proof
from protos import envelope, tensors
from protos.envelope import EnvelopeError

UNKNOWN_SESSION = "unknown or expired session"  # the peer's words when it does not know our session


@dataclass
class Answer:
    out: torch.Tensor
    ms: float
    proof: Proof  # its receipt and what that commits to (checked before use or after the call, see _send)


class Exchange:
    """Forward calls to peers; a failure of any kind comes out as one RemoteExpertError."""

    def __init__(
        self,
        channels: Channels,
        sessions: Sessions | None,
        stats: DispatchStats,
        receipts: DeferredReceipts,
        defer_receipts: bool,
    ) -> None:
        self.channels = channels
        self.sessions = sessions  # None: plaintext requests (peers must run --allow-plaintext)
        self.stats = stats
        self.receipts = receipts
        self.defer_receipts = defer_receipts

    async def call(self, call: PeerCall, x: torch.Tensor, dtype: torch.dtype, deadline: float) -> Answer:
        """The peer's answer for `call`'s rows of `x`, or RemoteExpertError naming the peer and experts."""
        positions = call.positions[0] if len(call.positions) == 1 else np.concatenate(call.positions)
        rows = x.index_select(0, torch.from_numpy(positions % x.shape[0])).to(dtype)
        replica = call.replica
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            for attempt in range(2):
                try:
                    return await self._send(call, rows, max(deadline - loop.time(), 1e-3), started)
                except grpc.aio.AioRpcError as e:
                    forgotten = e.code() == grpc.StatusCode.UNAUTHENTICATED and UNKNOWN_SESSION in (e.details() or "")
                    if attempt or not ((forgotten and self.sessions is not None) or relay_dropped(e)):
                        raise
                    if forgotten:  # the peer restarted or evicted our session: open a new one, once
                        self.sessions.forget(replica.record.route, replica.record.kx)
                    # a relayed connection reset (a relay's limits, a relay gone): once more, on a new one
        except grpc.aio.AioRpcError as e:
            uids = ", ".join(u for u, _ in call.segments)
            raise RemoteExpertError(
                f"peer {replica.peer_id} at {replica.record.endpoint} failed experts [{uids}]: "
                f"{e.code().name}: {e.details()}",
                e.code(),
                e.details() or "",
            ) from None
        except (EnvelopeError, tensors.TensorCodecError) as e:
            raise RemoteExpertError(f"peer {replica.peer_id} at {replica.record.endpoint}: {e}", None) from None
        raise AssertionError("unreachable")

    async def _send(self, call: PeerCall, rows: torch.Tensor, timeout: float, started: float) -> Answer:
        """Send one Forward (sealed when we have sessions), open and check the answer and its receipt."""
        replica = call.replica
        keys, counter = None, 0
        if self.sessions is not None:
            record = replica.record
            session = await self.sessions.get(record.route, record.kx, timeout, record.reach)
            keys, counter = session.keys, next(session.counters)
        sent = sealed.build_request(call.segments, rows, timeout, keys, counter)
        loop = asyncio.get_running_loop()
        written = loop.create_future()
        rpc = self.channels.forward(
            replica.record.route, sent.request, sent.plaintext.nbytes, timeout, written, replica.record.reach
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
        self.stats.record_peer_compute(response.compute_ms)
        if not tensors.all_finite(plain, out.dtype):  # NaN or inf: wrong whatever the receipt says
            self.stats.record_nonfinite()
            raise EnvelopeError("answered with non-finite values (NaN or inf)")
        proof = Proof(replica, sent, response, plain)
        if self.defer_receipts:
            # the session already proved who answered (only that peer holds its keys); the
            # receipt is evidence for disputes (a spot check that disagrees verifies it at
            # once), and its routine check (an output digest and a signature verification)
            # is kept off the layer call's critical path
            self.receipts.add(proof)
        else:  # plaintext: the signature is the only proof of origin; a bad one fails the call
            proof.receipt()
        return Answer(out, ms, proof)
