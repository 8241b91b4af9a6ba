"""A peer, bootstrap node or coordinator killed with SIGKILL (what the OOM killer does) leaves
nothing behind: its forked DHT process, that process's p2pd and torch_shm_manager die with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from coordinator.sim.local_swarm import LocalSwarm

GRACE_S = 10.0  # the DHT child notices within a fraction of a second; p2pd follows at once


def survivors(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {p.name()}")  # name cached when listed
        except psutil.NoSuchProcess:
            pass
    return alive


def kill_leader_and_wait(pid: int) -> tuple[list[str], list[str]]:
    """SIGKILL only the leader (not its group); (its descendants before, those still alive after)."""
    descendants = psutil.Process(pid).children(recursive=True)
    names = [p.name() for p in descendants]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + GRACE_S
    while survivors(descendants) and time.monotonic() < deadline:
        time.sleep(0.2)
    return names, survivors(descendants)


def test_sigkilled_peer_and_bootstrap_leave_no_descendants(tmp_path, tiny_checkpoint):
    with LocalSwarm(tmp_path / "swarm") as swarm:
        bootstrap = swarm.start_bootstrap()
        peer = swarm.start_peer("victim", "--checkpoint", str(tiny_checkpoint), "--experts", "0:0", "--threads", "1")
        for proc in (peer, bootstrap):
            names, alive = kill_leader_and_wait(proc.pid)
            assert "p2pd" in names and "python" in names  # the DHT child and its daemon were there
            assert not alive, f"{proc.name} left {alive}"


def ignores_sigint(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(mask & (1 << (signal.SIGINT - 1)))


def test_a_relayed_peers_own_daemon_outlasts_ctrl_c_and_dies_with_it(tmp_path, tiny_checkpoint):
    """A relayed peer's own p2pd (its relayed node's, beside its DHT child's) ignores the Ctrl-C a
    terminal sends the process group, so the peer can drain through it, and dies when it is killed."""
    with LocalSwarm(tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        args = ["--checkpoint", str(tiny_checkpoint), "--experts", "0:0", "--threads", "1", "--relay", "always"]
        peer = swarm.start_peer("relayed", *args)
        daemons = [p for p in psutil.Process(peer.pid).children(recursive=True) if p.name() == "p2pd"]
        assert len(daemons) == 2, daemons
        own = [d for d in daemons if d.ppid() == peer.pid]  # the relayed node's (the DHT child's is the other)
        assert len(own) == 1 and ignores_sigint(own[0].pid)
        _, alive = kill_leader_and_wait(peer.pid)
        assert not alive, alive


# a coordinator: a SwarmClient started from a worker thread (the DHT child's parent thread ends)
COORDINATOR = """
import sys, threading, time
from coordinator.client import SwarmClient
box = []
t = threading.Thread(target=lambda: box.append(SwarmClient(sys.argv[1:], [])))
t.start(); t.join()
print("up", flush=True)
time.sleep(600)
"""


def test_sigkilled_coordinator_leaves_no_descendants(swarm):
    proc = subprocess.Popen(
        [sys.executable, "-c", COORDINATOR, *swarm.initial_peers], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "up"
        time.sleep(1)  # the worker thread that forked the DHT child is gone: the child stays up
        names, alive = kill_leader_and_wait(proc.pid)
        assert "p2pd" in names and "python" in names
        assert not alive, f"the coordinator left {alive}"
    finally:
        proc.kill()
        proc.wait()
