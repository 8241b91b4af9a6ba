"""The floor under a layer call: a bare gRPC round trip with the same threads and processes.

A server process echoes each message of one bidirectional stream; the client sends from a
caller thread through the coordinator's I/O loop thread (LoopThread.run, as a layer call
does) and waits for the echo. What a layer call costs above this is our own work on both
sides (routing, sealing, the receipt, the peer's batcher and compute), measured in the same
run, so a slower or busier machine moves both numbers alike.

    python -m coordinator.bench.grpc_echo --ready-file F   (the server; the benchmark starts it)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import uvloop

import protos  # noqa: F401  (gRPC's settings, before grpc starts)
from coordinator.dispatch.loop import LoopThread
from coordinator.sim.local_swarm import LocalSwarm
from protos.limits import grpc_options
from protos.plumbing.files import write_json_atomic

METHOD = "/moe_swarm.bench.Echo/Stream"


def _same(b: bytes) -> bytes:
    return b


async def _echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


async def serve(ready: Path) -> None:
    handler = grpc.method_handlers_generic_handler(
        "moe_swarm.bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(_echo, _same, _same)}
    )
    server = grpc.aio.server(options=grpc_options())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    write_json_atomic(ready, {"endpoint": f"127.0.0.1:{port}"})
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def round_trip_ms(swarm: LocalSwarm, message_bytes: int, calls: int, warmup: int = 30) -> float:
    """Median ms of `calls` echoes of `message_bytes` through a fresh echo server in `swarm`."""
    server = swarm._spawn("grpc-echo", ["-m", "coordinator.bench.grpc_echo"])
    io = LoopThread("grpc-echo-client")
    message = b"x" * message_bytes
    try:

        async def open_stream() -> tuple[grpc.aio.Channel, grpc.aio.StreamStreamCall, asyncio.Queue]:
            channel = grpc.aio.insecure_channel(server.info["endpoint"], options=grpc_options())
            outbox: asyncio.Queue[bytes | None] = asyncio.Queue()

            async def requests() -> AsyncIterator[bytes]:
                while (item := await outbox.get()) is not None:
                    yield item

            call = channel.stream_stream(METHOD, request_serializer=_same, response_deserializer=_same)(requests())
            return channel, call, outbox

        channel, call, outbox = io.run(open_stream())

        async def echo() -> bytes:
            outbox.put_nowait(message)
            return await call.read()

        times = []
        for i in range(warmup + calls):
            started = time.perf_counter()
            if io.run(echo()) != message:
                raise RuntimeError("the echo server answered something else")
            if i >= warmup:
                times.append((time.perf_counter() - started) * 1e3)

        async def close() -> None:
            outbox.put_nowait(None)
            call.cancel()
            await channel.close()

        io.run(close())
        return statistics.median(times)
    finally:
        io.close()
        swarm.stop(server)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coordinator.bench.grpc_echo", description=__doc__.split("\n\n")[0])
    p.add_argument("--ready-file", type=Path, required=True, help="where the server writes its endpoint")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    uvloop.run(serve(args.ready_file))


if __name__ == "__main__":
    main()
