"""A peer leaves within --drain-timeout plus a few seconds however the signals arrive and
whatever state its DHT child is in, prints no traceback, and leaves no process behind."""

from __future__ import annotations

import signal
import time

import psutil
import pytest

DRAIN_S = 2.0
BOUND_S = DRAIN_S + 10.0  # two bounded DHT writes (3 s each) and the DHT node's shutdown (3 s)


def _start(swarm, name: str):
    (proc,) = swarm.start_peers({name: ["--seed", "0", "--experts", "*", "--threads", "1", "--drain-timeout", "2"]})
    return proc, psutil.Process(proc.pid).children(recursive=True)  # the DHT child and its p2pd


def _exit_within(proc, bound: float) -> float:
    start = time.monotonic()
    while proc.alive() and time.monotonic() - start < bound:
        time.sleep(0.05)
    took = time.monotonic() - start
    if proc.alive():
        proc.signal(signal.SIGKILL, group=True)
        pytest.fail(f"{proc.name} still running {bound:.0f}s after the signal:\n{proc.log_tail()}")
    return took


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE  # dead, maybe not reaped yet
    except psutil.NoSuchProcess:
        return True


def _wait_gone(processes: list[psutil.Process], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not all(_gone(p) for p in processes):
        assert time.monotonic() < deadline, [p.pid for p in processes if not _gone(p)]
        time.sleep(0.1)


def _left_nothing(proc, children: list[psutil.Process]) -> None:
    _wait_gone(children)
    log = proc.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize(
    "how",
    ["SIGTERM to the process", "SIGTERM to the group", "SIGINT twice", "DHT child killed first"],
)
def test_a_peer_leaves_in_bounded_time(swarm, how):
    proc, children = _start(swarm, f"leave-{how.split()[0].lower()}-{len(how)}")
    if how == "SIGTERM to the process":
        proc.signal(signal.SIGTERM)
    elif how == "SIGTERM to the group":  # what `timeout`, `kill -- -PGID` and supervisors do
        proc.signal(signal.SIGTERM, group=True)
    elif how == "SIGINT twice":
        proc.signal(signal.SIGINT)
        time.sleep(0.2)
        proc.signal(signal.SIGINT)
    else:
        dht = next(c for c in children if "python" in c.name().lower() or "python" in " ".join(c.cmdline()[:1]))
        dht.kill()
        _wait_gone([dht])
        proc.signal(signal.SIGTERM)
    took = _exit_within(proc, BOUND_S)
    assert proc.popen.returncode in (0, -signal.SIGTERM), proc.log_tail()
    if how == "SIGTERM to the process":
        assert "withdrawn from the DHT" in proc.log_tail(), proc.log_tail()
    if how == "SIGINT twice":
        assert took < DRAIN_S + 5, took  # the second signal skips the drain
    _left_nothing(proc, children)
