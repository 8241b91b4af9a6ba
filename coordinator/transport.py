"""gRPC channels to peers, one per endpoint, reused across calls."""

from __future__ import annotations

import grpc

from protos import DEFAULT_MAX_MESSAGE_BYTES, grpc_options
from protos import expert_service_pb2_grpc as pb_grpc


class Channels:
    """Cache of grpc.aio channels; create and use only on the coordinator's loop thread."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.ExpertServiceStub]] = {}

    def stub(self, endpoint: str) -> pb_grpc.ExpertServiceStub:
        entry = self._stubs.get(endpoint)
        if entry is None:
            channel = grpc.aio.insecure_channel(endpoint, options=grpc_options(self.max_message_bytes))
            entry = self._stubs[endpoint] = (channel, pb_grpc.ExpertServiceStub(channel))
        return entry[1]

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()
