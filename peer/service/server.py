"""The gRPC server around an ExpertServicer: lenient parsing, the per-address gate in front of
every method, the method table, the call budget (gate.py) and binding."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from protos import expert_service_pb2 as pb
from protos.limits import grpc_options

from .errors import RequestError
from .gate import client_address
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


def _gated_unary(servicer: ExpertServicer, handler: Callable) -> Callable:
    """A unary method served as stream-unary: the per-address gate is passed (or the call refused)
    before its message is read, so a refused caller gets no buffer beyond HTTP/2's window."""

    async def handle(requests: AsyncIterator[object | None], context: grpc.aio.ServicerContext) -> object:
        try:
            with servicer.gate.enter(client_address(context.peer())):
                return await handler(await anext(aiter(requests), None), context)  # unary: one message
        except RequestError as e:
            await context.abort(e.code, str(e))

    return handle


def _gated_stream(servicer: ExpertServicer) -> Callable:
    async def handle(
        requests: AsyncIterator[pb.ForwardRequest | None], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ForwardResponse]:
        try:
            with servicer.gate.enter(client_address(context.peer())):
                async with contextlib.aclosing(servicer.ForwardStream(requests, context)) as replies:
                    async for reply in replies:
                        yield reply
        except RequestError as e:
            await context.abort(e.code, str(e))

    return handle


def service_handler(servicer: ExpertServicer) -> grpc.GenericRpcHandler:
    unary = grpc.stream_unary_rpc_method_handler
    methods = {
        "Forward": (unary, _gated_unary(servicer, servicer.Forward), pb.ForwardRequest, pb.ForwardResponse),
        "ForwardStream": (
            grpc.stream_stream_rpc_method_handler,
            _gated_stream(servicer),
            pb.ForwardRequest,
            pb.ForwardResponse,
        ),
        "Info": (unary, _gated_unary(servicer, servicer.Info), pb.InfoRequest, pb.InfoResponse),
        "OpenSession": (unary, _gated_unary(servicer, servicer.OpenSession), pb.SessionHello, pb.SessionAccept),
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
    budget = servicer.budget
    server = grpc.aio.server(
        options=grpc_options(max_message_bytes, budget.receive_bytes) + budget.server_options(),
        maximum_concurrent_rpcs=budget.max_rpcs,
    )
    server.add_generic_rpc_handlers((service_handler(servicer),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port} (in use or not a local address)")
    await server.start()
    return server, bound
