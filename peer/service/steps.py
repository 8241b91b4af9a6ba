"""The steps of one Forward around the compute: validate (every cheap check), open (seal,
session, replay window, access and rate limits) and answer (seal the outputs, sign the receipt).

Sealed requests are opened only after every cheap check passed, and their counter is
marked used only once the payload authenticated, so forgeries cannot burn a session's
counters.
"""

from __future__ import annotations

import grpc
import torch

from protos import envelope, tensors
from protos import expert_service_pb2 as pb
from protos.envelope import EnvelopeError, Identity

from ..backends.base import ExpertBackend
from ..sessions import Session
from .errors import RequestError
from .settings import Access, ServiceLimits

Segments = list[tuple[str, int]]


def lookup_session(request: pb.ForwardRequest, access: Access) -> Session | None:
    """The request's session (None for plaintext), looked up before anything else about it."""
    if not request.session_id:
        return None
    session = access.sessions.get(request.session_id)
    if session is None:
        raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "unknown or expired session")
    return session


def validate(request: pb.ForwardRequest, experts: ExpertBackend, limits: ServiceLimits) -> tuple[Segments, int, bytes]:
    """(segments, rows, the input bytes): every cheap check before any crypto or compute.
    The segment count is bounded before the segments are looked at: a valid request has at
    most one segment per hosted expert, each of at least one row."""
    count = len(request.segments)
    if not count:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "request has no segments")
    if count > min(len(experts.slots), limits.max_rows):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request has {count} segments; this peer hosts {len(experts.slots)} experts "
            f"and takes <= {limits.max_rows} rows",
        )
    segments = []
    for seg in request.segments:
        if seg.expert_uid not in experts.slots:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"expert {seg.expert_uid!r} is not hosted here")
        if seg.num_rows == 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"segment {seg.expert_uid!r} has 0 rows")
        segments.append((seg.expert_uid, seg.num_rows))
    rows = sum(r for _, r in segments)
    if rows > limits.max_rows:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"request carries {rows} rows; this peer takes <= {limits.max_rows}"
        )
    return segments, rows, _check_inputs(request.inputs, rows, experts, limits, sealed=bool(request.session_id))


def _check_inputs(inp: pb.Tensor, rows: int, experts: ExpertBackend, limits: ServiceLimits, sealed: bool) -> bytes:
    hidden = experts.hidden_dim
    want_dtype = tensors.dtype_name(experts.dtype)
    if inp.dtype != want_dtype:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"inputs dtype is {inp.dtype!r}; these experts take {want_dtype!r}"
        )
    if list(inp.shape) != [rows, hidden]:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"inputs shape is {list(inp.shape)}; segments need [{rows}, {hidden}]",
        )
    try:
        _, _, expected = tensors.check_header(inp, max_bytes=limits.max_message_bytes)
    except tensors.TensorCodecError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    data = inp.data  # read once: every read of a protobuf bytes field is a fresh copy
    if len(data) != expected + (envelope.TAG_LEN if sealed else 0):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"inputs carry {len(data)} bytes; shape {list(inp.shape)} {inp.dtype} needs {expected}"
            + (f" + {envelope.TAG_LEN} (seal tag)" if sealed else ""),
        )
    return data


def open_inputs(
    request: pb.ForwardRequest, segments: Segments, data: bytes, address: str, access: Access, session: Session | None
) -> tuple[torch.Tensor, bytes, bytes]:
    """The plaintext inputs (as a tensor and as bytes) and the request header they were bound
    to. `address` is the caller's network address (rate limits; it names plaintext callers)."""
    inp = request.inputs
    header = envelope.request_header(
        request.session_id,
        request.request_id,
        request.counter,
        request.timestamp_ms,
        request.deadline_ms,
        segments,
        inp.dtype,
        inp.shape,
    )
    client: bytes | str = address
    if session is None:
        if not access.allow_plaintext:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "this peer only takes sealed requests")
        if access.allow_clients is not None:
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED, "this peer only serves allowlisted clients")
        plaintext = data
    else:
        try:
            envelope.check_fresh(request.timestamp_ms)
            plaintext = envelope.open_sealed(session.keys.to_peer, request.counter, data, header)
        except EnvelopeError as e:
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
        if not session.window.accept(request.counter):
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "replayed or too old counter")
        client = session.client
    rows = sum(r for _, r in segments)
    if access.address_limiter is not None and not access.address_limiter.allow(address, rows):
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit for this address exceeded")
    if access.rate_limiter is not None and not access.rate_limiter.allow(client, rows):
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit for this client exceeded")
    dtype = tensors.dtype_from_name(inp.dtype)
    return tensors.from_bytes(plaintext, dtype, tuple(inp.shape)), plaintext, header


def answer(
    request: pb.ForwardRequest,
    header: bytes,
    request_digest: bytes,
    out: torch.Tensor,
    segments: Segments,
    session: Session | None,
    identity: Identity,
    model_id: str,
) -> pb.ForwardResponse:
    """The response: outputs (sealed when the request was) and the signed receipt."""
    dtype, shape, data = tensors.payload(out)
    out_header = envelope.response_header(header, dtype, shape)
    statement = envelope.receipt_statement(
        request_digest, envelope.digest(out_header, data), [u for u, _ in segments], model_id
    )
    # sealing writes new bytes; plaintext is copied out of the tensor (a field takes bytes only)
    if session is not None:
        data = envelope.seal(session.keys.to_client, request.counter, data, out_header)
    else:
        data = bytes(data)
    response = pb.ForwardResponse(request_id=request.request_id, receipt=identity.sign(statement))
    # fields set in place: a Tensor built apart would be copied again into the response
    response.outputs.dtype = dtype
    response.outputs.shape.extend(shape)
    response.outputs.data = data
    return response
