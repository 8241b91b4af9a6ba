"""A TCP link with a round-trip time: what a peer across the internet looks like from here.

This kernel has no `netem`, so the delay is added in user space: a relay process listens
on one port and forwards to a target, holding every chunk for `one_way_ms` in each
direction before passing it on. Chunks keep their order and the link keeps no more than
the delay in flight (it does not limit bandwidth), like a long, fat pipe. A request thus
pays the full RTT, whatever its size, and pipelined requests overlap as on a real link.

    python -m coordinator.sim.delay_link --listen 40001 --target 40000 --one-way-ms 25

The relay runs in its own process, so its timers do not share a GIL or an event loop with
the client it delays.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
from pathlib import Path

import uvloop

CHUNK_BYTES = 256 * 1024
# what one direction may hold while the far side does not read: a slow reader backs up to
# the sender as TCP would, instead of growing this process without bound
QUEUE_CHUNKS = 256


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Read chunks as they come and write each `delay_s` after it was read, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

    async def deliver() -> None:
        broken = False  # the far side is gone: keep draining so the reader never blocks on a full queue
        while True:
            due, data = await queue.get()
            if not data:
                break
            if broken:
                continue
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                broken = True
        with contextlib.suppress(OSError):
            writer.write_eof()

    delivery = asyncio.ensure_future(deliver())
    try:
        while data := await reader.read(CHUNK_BYTES):
            await queue.put((loop.time() + delay_s, data))
        await queue.put((loop.time() + delay_s, b""))
        await delivery
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        delivery.cancel()


async def _serve_connection(
    client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, target: tuple[str, int], delay_s: float
) -> None:
    try:
        up_r, up_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    for sock_writer in (client_w, up_w):  # a delayed link must not also wait for Nagle
        sock = sock_writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await asyncio.gather(_pump(client_r, up_w, delay_s), _pump(up_r, client_w, delay_s))
    finally:
        for w in (client_w, up_w):
            w.close()


async def serve(host: str, listen: int, target: tuple[str, int], one_way_ms: float, ready: Path | None) -> None:
    delay_s = one_way_ms / 1000.0
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(r, w, target, delay_s), host, listen, reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    if ready is not None:
        tmp = ready.with_suffix(".tmp")
        tmp.write_text(json.dumps({"endpoint": f"{host}:{port}", "target": f"{target[0]}:{target[1]}"}))
        os.replace(tmp, ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m coordinator.sim.delay_link", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--listen", type=int, default=0, help="port to listen on (0 picks one: see --ready-file)")
    p.add_argument("--target", required=True, help="PORT or HOST:PORT to forward to")
    p.add_argument("--one-way-ms", type=float, required=True, help="delay each direction (RTT / 2)")
    p.add_argument("--ready-file", type=Path, default=None, help="write the listening endpoint here as JSON")
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if not port.isdigit() or args.one_way_ms < 0:
        p.error(f"--target must be PORT or HOST:PORT and --one-way-ms >= 0, got {args.target!r}, {args.one_way_ms}")
    uvloop.run(serve(args.host, args.listen, (host or "127.0.0.1", int(port)), args.one_way_ms, args.ready_file))


if __name__ == "__main__":
    main()
