"""`moe-swarm bootstrap`: a stable identity (--key-file), an announced address, relay limits."""

from __future__ import annotations

import socket
import subprocess
import sys

from coordinator.sim.local_swarm import LocalSwarm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_key_file_keeps_the_multiaddr_across_restarts(tmp_path):
    key, port = tmp_path / "libp2p.key", free_port()
    argv = ["--key-file", str(key), "--port", str(port), "--announce-host", "127.0.0.1"]
    seen = []
    for run in range(2):
        with LocalSwarm(tmp_path / f"run{run}") as swarm:
            proc = swarm.start_bootstrap(*argv)
            seen.append(proc.info["maddrs"])
            assert proc.info["relay"] is True  # relaying is on by default
    assert key.exists()
    assert seen[0] == seen[1] == [seen[0][0]]  # one announced address, the same peer id both times
    assert seen[0][0].startswith(f"/ip4/127.0.0.1/tcp/{port}/p2p/")


def test_bad_bootstrap_flags_get_one_line():
    for argv, says in (
        (["--announce-host", "203.0.113.7"], "--announce-host needs an explicit --port"),
        (["--relay-data-limit", "0"], "--relay-* limits must be positive"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "coordinator", "bootstrap", *argv], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
