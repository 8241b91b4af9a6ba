"""The limits both ends agree on, in one place: message sizes, rows per request, queued rows,
and the gRPC options that carry them. A peer may configure less than a default."""

from __future__ import annotations

# A 512x4096 bf16 tensor is 4 MiB, gRPC's default cap,
# so the default is well above it; a peer may configure less.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_ROWS = 16384
DEFAULT_MAX_QUEUE_ROWS = 4 * DEFAULT_MAX_ROWS  # admission control on a peer
MAX_NDIM = 4  # a tensor on the wire: rows x hidden, with room for a leading batch dimension
MAX_ENDPOINT_LEN = 256  # host:port in a DHT record (a DNS name is at most 253 characters)
MAX_RECORD_BYTES = 2048  # a whole serialized PeerRecord: every node refuses a larger value
# a request's bytes besides its payload: ids, counters, timestamps, shape, dtype (well under 1 KiB)
# and one segment per expert (a uid of at most a few hundred bytes and a row count)
REQUEST_HEADER_BYTES = 64 * 1024
SEGMENT_BYTES = 512
SEAL_TAG_BYTES = 16


def request_bytes_limit(max_rows: int, hidden: int, itemsize: int, experts: int, configured: int) -> int:
    """The largest request a peer can receive: what a valid one can be (max_rows x hidden x
    itemsize of payload, its seal tag, a header with one segment per hosted expert), never more
    than the configured message limit."""
    valid = max_rows * hidden * itemsize + SEAL_TAG_BYTES + REQUEST_HEADER_BYTES + experts * SEGMENT_BYTES
    return min(valid, configured)


def grpc_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_receive_bytes: int | None = None
) -> list[tuple[str, int]]:
    """Channel/server options used on both sides (a peer receives at most `max_receive_bytes`).

    so_reuseport=0: otherwise a second server silently binds an already-used port.
    Compression stays off (gzip costs far more than it saves on float tensors).
    """
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes or max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.enable_retries", 0),
    ]
