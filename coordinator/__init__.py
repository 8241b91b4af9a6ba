"""The client side: swarm view, dispatch to remote experts, the RemoteMoE layer. Imports protos only."""

import protos  # noqa: F401  (first: it sets gRPC options that are read when grpc is imported)
