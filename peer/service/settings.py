"""The servicer's settings, grouped by what they govern: sizes and queues (ServiceLimits),
who may call and how (Access), and how the device batches (Batching)."""

from __future__ import annotations

from dataclasses import dataclass, field

from protos.envelope import Identity
from protos.limits import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_QUEUE_ROWS, DEFAULT_MAX_ROWS

from ..hellos import HelloGuard
from ..sessions import RateLimiter, SessionTable
from .gate import DEFAULT_REQUEST_MEMORY

DEFAULT_MAX_STREAM_REQUESTS = 256  # read and not yet answered on one stream, unsent answers included


@dataclass(frozen=True)
class ServiceLimits:
    max_rows: int = DEFAULT_MAX_ROWS  # token rows per request
    max_queue_rows: int = DEFAULT_MAX_QUEUE_ROWS  # admission control: rows admitted and not yet answered
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_stream_requests: int = DEFAULT_MAX_STREAM_REQUESTS
    request_memory: int = DEFAULT_REQUEST_MEMORY  # bytes of requests being received at once (gate.py)


@dataclass
class Access:
    identity: Identity = field(default_factory=Identity.generate)  # signs receipts, opens sessions
    allow_plaintext: bool = False  # unsealed requests: benchmarks and trusted networks only
    allow_clients: frozenset[bytes] | None = None  # None: a public peer
    rate_limiter: RateLimiter | None = None  # token rows per client identity
    address_limiter: RateLimiter | None = None  # token rows per client address, whatever identities it uses
    sessions: SessionTable = field(default_factory=SessionTable)
    hellos: HelloGuard = field(default_factory=HelloGuard)


@dataclass(frozen=True)
class Batching:
    max_batch_rows: int = 4096  # most token rows the device computes in one merged batch
    batch_wait_ms: float = 0.0  # wait this long for more requests (0: batch only what is queued)
    compute_cpus: frozenset[int] | None = None  # pin the compute thread here (None: anywhere)
