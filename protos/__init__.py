"""The contract shared by peers and coordinators: wire messages, codec, DHT records, model format.

Imports neither `peer` nor `coordinator`.
"""

import os as _os
from importlib import metadata as _metadata

# gRPC's fork support re-initialises its core in forked children. Our forked children (the
# hivemind DHT node a coordinator starts) never use gRPC, and with calls or streams alive in
# the parent those handlers crashed the child (segfault right after fork). Read once, when
# grpc is first imported: every package of ours imports this one before grpc.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

PROTOCOL = "moe_swarm.v1"

try:
    __version__ = _metadata.version("moe-swarm")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

# Explicit limits both ends agree on. A 512x4096 bf16 tensor is 4 MiB, gRPC's default cap,
# so the default is well above it; a peer may configure less.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_ROWS = 16384
DEFAULT_MAX_QUEUE_ROWS = 4 * DEFAULT_MAX_ROWS  # admission control on a peer


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
