"""moe-peer refuses bad configuration with a clear message, and leaves cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

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
        (["--seed", "0", "--compute-cpus", "4096"], "not available to this process"),
        (["--seed", "0", "--compute-cpus", "0-x"], "expected N or A-B"),
        (["--seed", "0", "--host", "0.0.0.0"], "add --announce-host"),
        (["--seed", "0", "--key-file", "/"], "is a directory"),
        (["--seed", "0", "--experts", "0:1-0"], "reversed"),
    ],
)
def test_bad_configuration_exits_with_message(args, words):
    result = run_peer(*args)
    assert result.returncode == 2
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # the one line, nothing before it


@pytest.mark.unit
def test_parse_cpu_list():
    from peer.host import parse_cpu_list

    assert parse_cpu_list("0-2,5, 7") == {0, 1, 2, 5, 7}
    for bad in ["", "3-1", "-1", "a"]:
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def _allowed_cpus(pid: int, tid: int) -> str:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or 0 not in os.sched_getaffinity(0), reason="needs CPU 0 and one more"
)
def test_compute_cpus_keep_the_expert_math_apart_from_everything_else(swarm):
    import grpc
    import torch

    from peer.backends.toy import HostedExperts
    from protos import expert_service_pb2 as pb
    from protos import expert_service_pb2_grpc as pb_grpc
    from protos.toy_model import ToyConfig

    from .sealing import SealedStub

    proc = swarm.start_peer("peer-pinned", "--seed", "3", "--hidden", "16", "--ffn", "16", "--compute-cpus", "0")
    try:
        host = ",".join(map(str, sorted(os.sched_getaffinity(0) - {0})))
        with grpc.insecure_channel(proc.info["endpoint"]) as channel:
            stub = SealedStub(pb_grpc.ExpertServiceStub(channel))
            uid = stub.stub.Info(pb.InfoRequest(), timeout=10).experts[0].uid
            x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
            out = stub.forward(uid, x)  # the compute thread starts with the first request
        config = ToyConfig(num_layers=2, num_experts=8, hidden_dim=16, ffn_dim=16)
        reference = HostedExperts.from_seed(config, 3, "*", torch.device("cpu")).forward(x, [(uid, 5)])
        assert torch.allclose(out, reference, atol=1e-6)
        threads = {int(t): _allowed_cpus(proc.pid, int(t)) for t in os.listdir(f"/proc/{proc.pid}/task")}
        assert threads[proc.pid] == host  # the loop, gRPC and crypto: off the compute CPU
        assert "0" in threads.values()  # the expert-compute thread
        assert set(threads.values()) == {host, "0"}
    finally:
        swarm.stop(proc)


def test_ctrl_c_to_the_process_group_drains_and_withdraws(swarm):
    proc = swarm.start_peer("peer-ctrl-c", "--seed", "0", "--hidden", "16", "--ffn", "16")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: the peer, its DHT process and p2pd
    assert proc.popen.wait(30) == 0
    log = proc.log_path.read_text()
    assert "withdrawn from the DHT" in log and "Traceback" not in log
    # where its start-up time went, in the log and the ready file; the phases add up to the whole
    phases = dict(proc.info["startup_s"])
    total = phases.pop("total")
    assert list(phases) == ["imports", "experts", "dht", "throughput", "server", "online"]
    assert 0 < total < 120 and abs(sum(phases.values()) - total) < 0.05, proc.info["startup_s"]
    assert re.search(r"serving .*, [\d.]+s after launch \(imports [\d.]+, experts [\d.]+, dht [\d.]+, ", log), log


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
        "--relay",
        "never",  # with relays allowed (the default) it serves through them instead (tests/test_relay.py)
        "--initial-peers",
        *swarm.initial_peers,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot reach this peer at 127.0.0.1:{dead}" in result.stderr
    assert "--announce-host" in result.stderr and "Traceback" not in result.stderr
    assert "--relay auto" in result.stderr


def test_a_dht_port_in_use_is_refused_with_one_line(swarm):
    taken = swarm.initial_peers[0].split("/tcp/")[1].split("/")[0]  # the bootstrap node's port
    for argv in (
        ["-m", "peer", "serve", "--seed", "0", "--dht-port", taken],
        ["-m", "coordinator", "bootstrap", "--port", taken],
    ):
        result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert f"127.0.0.1:{taken}: Address already in use; pick another port" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
