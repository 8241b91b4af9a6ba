"""The volunteer node: hosts a few experts and serves them over gRPC. Imports protos only."""

import protos  # noqa: F401  (first: it sets gRPC options that are read when grpc is imported)
