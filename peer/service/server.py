"""The gRPC server around an ExpertServicer: lenient parsing, method table, binding."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

from protos import expert_service_pb2 as pb
from protos.limits import grpc_options

from .servicer import ExpertServicer


def _lenient(message: type) -> Callable[[bytes], object | None]:
    """A deserializer that answers bytes that are not a valid message with None (the handler
    then refuses with INVALID_ARGUMENT) instead of grpc's generic UNKNOWN."""

    def parse(data: bytes) -> object | None:
        try:
            return message.FromString(data)
        except DecodeError:
            return None

    return parse


def service_handler(servicer: ExpertServicer) -> grpc.GenericRpcHandler:
    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler
    methods = {
        "Forward": (unary, servicer.Forward, pb.ForwardRequest, pb.ForwardResponse),
        "ForwardStream": (stream, servicer.ForwardStream, pb.ForwardRequest, pb.ForwardResponse),
        "Info": (unary, servicer.Info, pb.InfoRequest, pb.InfoResponse),
        "OpenSession": (unary, servicer.OpenSession, pb.SessionHello, pb.SessionAccept),
    }
    return grpc.method_handlers_generic_handler(
        "moe_swarm.v1.ExpertService",
        {
            name: kind(handler, request_deserializer=_lenient(req), response_serializer=resp.SerializeToString)
            for name, (kind, handler, req, resp) in methods.items()
        },
    )


async def start_server(
    servicer: ExpertServicer, host: str, port: int, max_message_bytes: int
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=grpc_options(max_message_bytes))
    server.add_generic_rpc_handlers((service_handler(servicer),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port} (in use or not a local address)")
    await server.start()
    return server, bound
