"""What a caller can pin on a peer before it is authenticated: the gRPC-level budget.

Every request this peer can receive is at most `receive_bytes` (derived from what a valid
request can be: protos/limits.request_bytes_limit). Calls are counted from their start,
before their message is read: at most `max_rpcs` at once in all (gRPC refuses more with
RESOURCE_EXHAUSTED) and `rpcs_per_address` from one network address (refused by the
CallGate before the handler reads a byte of the message). So the memory held by requests
being received is at most max_rpcs x receive_bytes in all, rpcs_per_address x receive_bytes
per address, whatever the callers send or hold half-sent. HTTP/2 caps streams per
connection at `streams_per_connection`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from protos.limits import request_bytes_limit

from .errors import RequestError

DEFAULT_REQUEST_MEMORY = 1 << 30  # bytes of requests being received at once, all callers together
MIN_RPCS, MAX_RPCS = 8, 4096
ADDRESS_SHARE = 4  # one address may hold a quarter of the calls
STREAMS_PER_CONNECTION = 64  # a client opening more waits for a free one (HTTP/2 queues them)
MAX_CONNECTIONS = 1024


@dataclass(frozen=True)
class CallBudget:
    receive_bytes: int
    max_rpcs: int
    rpcs_per_address: int

    @classmethod
    def derive(
        cls, max_rows: int, hidden: int, itemsize: int, experts: int, max_message_bytes: int, memory: int
    ) -> CallBudget:
        receive = request_bytes_limit(max_rows, hidden, itemsize, experts, max_message_bytes)
        rpcs = max(MIN_RPCS, min(MAX_RPCS, memory // receive))
        return cls(receive, rpcs, max(2, rpcs // ADDRESS_SHARE))

    def server_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
            ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
        ]


def client_address(peer: str) -> str:
    """The network address of a gRPC peer string, without its port ('ipv4:1.2.3.4:5' ->
    '1.2.3.4', 'ipv6:[::1]:5' -> '::1'); other forms as given."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0]
        return host.strip("[]") or rest
    return peer


def caller_address(context: object) -> str:
    """The caller's address from a gRPC context, or from another transport's context that
    names its caller with peer() the same way; "" (one shared budget) when it names none."""
    peer = getattr(context, "peer", None)
    return client_address(peer()) if callable(peer) else ""


class CallGate:
    """Calls in progress per client address, bounded."""

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self._calls: dict[str, int] = {}

    def calls(self, address: str) -> int:
        return self._calls.get(address, 0)

    @contextlib.contextmanager
    def enter(self, address: str) -> Iterator[None]:
        n = self._calls.get(address, 0)
        if n >= self.per_address:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{n} calls in progress from this address; the limit is {n}"
            )
        self._calls[address] = n + 1
        try:
            yield
        finally:
            left = self._calls[address] - 1
            if left:
                self._calls[address] = left
            else:
                del self._calls[address]
