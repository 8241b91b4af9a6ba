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


def grpc_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel/server options used on both sides.

    so_reuseport=0: otherwise a second server silently binds an already-used port.
    Compression stays off (gzip costs far more than it saves on float tensors).
    """
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.enable_retries", 0),
    ]
