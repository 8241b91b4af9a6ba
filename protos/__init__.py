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
# gRPC's EventEngine client and listener hand every read and write to threads of their own,
# and grpc.aio hands completions on to the event loop from one more: several thread wake-ups
# per message each way. The core's own poller does the I/O on the thread that polls, which
# cuts a loopback round trip by about a third (docs/benchmarks.md, decode step). An empty
# GRPC_EXPERIMENTS keeps gRPC's default.
_os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")

PROTOCOL = "moe_swarm.v1"

try:
    __version__ = _metadata.version("moe-swarm")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
