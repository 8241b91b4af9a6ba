"""What a delay link itself adds: small TCP round trips through a link of a given RTT.

The link is a user-space relay; on a busy machine its timers fire late and it waits for a
core, so a round trip through it takes more than its nominal RTT. The generation benchmark
reports this next to its floor, so a ratio above the floor can be read for what it is.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

from coordinator.sim.local_swarm import LocalSwarm

PING_BYTES = 256


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, name="link-probe-echo", daemon=True).start()
    return server, server.getsockname()[1]


def link_round_trip_ms(swarm: LocalSwarm, rtt_ms: float, pings: int = 30) -> dict[str, float]:
    """Median and p90 round trip of PING_BYTES through a fresh link of `rtt_ms` started in `swarm`."""
    _, port = _echo_server()
    link = swarm._spawn(
        f"probe-link-{port}",
        ["-m", "coordinator.sim.delay_link", "--target", str(port), "--one-way-ms", str(rtt_ms / 2)],
    )
    host, _, link_port = link.info["endpoint"].rpartition(":")
    times = []
    try:
        with socket.create_connection((host, int(link_port)), timeout=10) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(pings):
                started = time.perf_counter()
                conn.sendall(b"x" * PING_BYTES)
                got = 0
                while got < PING_BYTES:
                    chunk = conn.recv(65536)
                    if not chunk:
                        raise ConnectionError("the delay link closed the probe's connection")
                    got += len(chunk)
                times.append((time.perf_counter() - started) * 1e3)
    finally:
        swarm.stop(link)
    times.sort()
    return {"link_rtt_p50_ms": statistics.median(times), "link_rtt_p90_ms": times[int(0.9 * (len(times) - 1))]}
