"""Forward messages as a client builds and checks them: sealed (or plaintext) requests and
their answers, with the peer's receipt verified. One implementation for every caller."""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from protos import envelope, tensors
from protos import expert_service_pb2 as pb
from protos.envelope import EnvelopeError, Identity, SessionKeys
from protos.records import parse_expert_uid


def hello(identity: Identity, peer_kx: bytes) -> tuple[pb.SessionHello, SessionKeys]:
    h, keys = envelope.client_hello(identity, peer_kx)
    msg = pb.SessionHello(
        client_identity=h.client_identity,
        client_ephemeral=h.client_ephemeral,
        timestamp_ms=h.timestamp_ms,
        signature=h.signature,
    )
    return msg, keys


# Request ids: unique within this process by the counter, across processes by the random prefix
# (cheaper than a uuid4 per call; ids only match answers and cancels to requests on a stream).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


@dataclass
class Sent:
    """A built request and what is needed to check its answer."""

    request: pb.ForwardRequest
    header: bytes
    plaintext: memoryview
    keys: SessionKeys | None
    uids: list[str]

    # computed on first use; a caller may compute them while the request is on its way
    @functools.cached_property
    def digest(self) -> bytes:
        """The request's digest, which the peer's receipt signs."""
        return envelope.digest(self.header, self.plaintext)

    @functools.cached_property
    def response_header(self) -> bytes:
        """The associated data the answer is sealed under (its dtype and shape are the request's)."""
        inputs = self.request.inputs
        return envelope.response_header(self.header, inputs.dtype, inputs.shape)


def build_request(
    segments: Sequence[tuple[str, int]],
    rows: torch.Tensor,
    timeout_s: float,
    keys: SessionKeys | None = None,
    counter: int = 0,
) -> Sent:
    """The Forward request for `rows` (segments' rows concatenated), sealed under `keys` if given."""
    name, shape, data = tensors.payload(rows)
    request_id = f"{_ID_PREFIX}-{next(_ID_COUNTER)}"
    now_ms = envelope.wall_ms()
    session_id = keys.session_id if keys else b""
    deadline_ms = now_ms + int(timeout_s * 1000)
    header = envelope.request_header(session_id, request_id, counter, now_ms, deadline_ms, segments, name, shape)
    payload = envelope.seal(keys.to_peer, counter, data, header) if keys else data.tobytes()
    request = pb.ForwardRequest(
        request_id=request_id,
        segments=[pb.Segment(expert_uid=u, num_rows=n) for u, n in segments],
        session_id=session_id,
        counter=counter,
        timestamp_ms=now_ms,
        deadline_ms=deadline_ms,
    )
    # set in place: a Tensor message built apart would be copied again into the request
    request.inputs.dtype = name
    request.inputs.shape.extend(shape)
    request.inputs.data = payload
    return Sent(request, header, data, keys, [u for u, _ in segments])


def open_payload(sent: Sent, response: pb.ForwardResponse) -> tuple[torch.Tensor, bytes]:
    """(outputs, their plaintext bytes) of an answer, opened and size-checked; EnvelopeError if
    it does not authenticate. Its receipt is checked apart (`check_receipt`)."""
    inp, out = sent.request.inputs, response.outputs
    if out.dtype != inp.dtype or list(out.shape) != list(inp.shape):
        raise EnvelopeError(f"returned {out.dtype} {list(out.shape)}, expected {inp.dtype} {list(inp.shape)}")
    if sent.keys is not None:
        plain = envelope.open_sealed(sent.keys.to_client, sent.request.counter, out.data, sent.response_header)
    else:
        plain = out.data
    if len(plain) != len(sent.plaintext):
        raise EnvelopeError(f"returned {len(plain)} bytes, expected {len(sent.plaintext)}")
    return tensors.from_bytes(plain, tensors.dtype_from_name(out.dtype), tuple(out.shape)), plain


def check_receipt(sent: Sent, response: pb.ForwardResponse, plain: bytes, peer_identity: bytes) -> bytes:
    """The statement the peer signed about this request and its answer (`plain`, the opened
    outputs); EnvelopeError if the signature does not verify against `peer_identity`."""
    statement = envelope.receipt_statement(
        sent.digest,
        envelope.digest(sent.response_header, plain),
        sent.uids,
        parse_expert_uid(sent.uids[0])[0],
    )
    if not envelope.verify(peer_identity, response.receipt, statement):
        raise EnvelopeError("receipt signature does not verify against the identity the peer announced")
    return statement


def open_response(sent: Sent, response: pb.ForwardResponse, peer_identity: bytes) -> tuple[torch.Tensor, bytes]:
    """(outputs, the receipt statement the peer signed); EnvelopeError if anything does not check out."""
    out, plain = open_payload(sent, response)
    return out, check_receipt(sent, response, plain, peer_identity)
