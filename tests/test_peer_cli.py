"""moe-peer refuses bad configuration with a clear message, and leaves cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest


def run_peer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peer", "serve", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--checkpoint", "/nonexistent/ckpt"], "not a moe-swarm checkpoint"),
        (["--seed", "0", "--experts", "5:0"], "outside 0..1"),
        (["--seed", "0", "--experts", "0"], "LAYERS:EXPERTS"),
        (["--seed", "0", "--hidden", "0"], "must be >= 1"),
    ],
)
def test_bad_configuration_exits_with_message(args, words):
    result = run_peer(*args)
    assert result.returncode == 2
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_to_the_process_group_drains_and_withdraws(swarm):
    proc = swarm.start_peer("peer-ctrl-c", "--seed", "0", "--hidden", "16", "--ffn", "16")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: the peer, its DHT process and p2pd
    assert proc.popen.wait(30) == 0
    log = proc.log_path.read_text()
    assert "withdrawn from the DHT" in log and "Traceback" not in log


def test_unreachable_announced_address_is_refused_with_what_to_do(swarm):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    result = run_peer(
        "--seed",
        "0",
        "--hidden",
        "16",
        "--ffn",
        "16",
        "--announce-port",
        str(dead),
        "--initial-peers",
        *swarm.initial_peers,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot reach this peer at 127.0.0.1:{dead}" in result.stderr
    assert "--announce-host" in result.stderr and "Traceback" not in result.stderr
