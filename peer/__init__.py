"""The volunteer node: hosts a few experts and serves them over gRPC. Imports protos only."""
