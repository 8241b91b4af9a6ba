"""The delay link holds each direction for what it says: requests and answers both arrive
no sooner than one-way delay after they were sent, and back-to-back sends overlap in
flight instead of queueing behind each other."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from coordinator.sim.local_swarm import LocalSwarm

ONE_WAY_S = 0.06
SLACK_S = 0.5  # scheduling noise on a loaded 2-core machine; the lower bounds are what is measured
EARLY_S = 0.002  # an event loop may fire a timer up to its clock resolution early


@pytest.fixture()
def echo():
    """A TCP server in this process that stamps when each byte arrives and echoes it at once."""
    server = socket.create_server(("127.0.0.1", 0))
    arrivals: list[float] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(1):
                arrivals.append(time.monotonic())
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], arrivals
    server.close()


def test_both_directions_are_delayed_and_sends_overlap(echo, tmp_path):
    port, arrivals = echo
    with LocalSwarm(tmp_path) as swarm:
        link = swarm._spawn(
            "link",
            ["-m", "coordinator.sim.delay_link", "--target", str(port), "--one-way-ms", str(ONE_WAY_S * 1000)],
        )
        host, _, link_port = link.info["endpoint"].rpartition(":")
        with socket.create_connection((host, int(link_port))) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sent = []
            for byte in (b"a", b"b"):
                sent.append(time.monotonic())
                c.sendall(byte)
                time.sleep(ONE_WAY_S / 3)
            back = []
            for _ in sent:
                assert c.recv(1)
                back.append(time.monotonic())
    for t_sent, t_arrived, t_back in zip(sent, arrivals, back, strict=True):
        assert ONE_WAY_S - EARLY_S <= t_arrived - t_sent < ONE_WAY_S + SLACK_S  # there
        assert ONE_WAY_S - EARLY_S <= t_back - t_arrived < ONE_WAY_S + SLACK_S  # and back
    # the second byte was sent a third of the delay later and is not held behind the first's round trip
    assert back[1] - back[0] < ONE_WAY_S
