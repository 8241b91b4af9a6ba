"""Helpers die with the process they serve, on every exit path, SIGKILL included.

A hivemind DHT node is a forked child of the peer, bootstrap or coordinator, and it starts
the libp2p daemon (p2pd) as its own child. When the parent is killed (the OOM killer, a
supervisor, a test), nothing would tell either of them: they would live on, orphaned, with
a libp2p node still in the swarm. So:

- the forked DHT child watches its parent (`watch_parent`, a daemon thread): once it is
  re-parented, it exits at once;
- every program the DHT child starts (p2pd) gets PR_SET_PDEATHSIG(SIGKILL) before exec,
  so it dies with the DHT child however that one ends;
- a libp2p node started in the process itself (a relayed peer's, a coordinator's dialing
  node) gets the same for its p2pd, which also ignores SIGINT as the DHT child's does (it
  inherits the SIG_IGN hivemind's DHT child sets).

A watch rather than PR_SET_PDEATHSIG for the DHT child: the parent-death signal fires when
the *thread* that forked exits, and a coordinator may start its DHT from a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

PR_SET_PDEATHSIG = 1
WATCH_PERIOD_S = 0.25


@functools.cache
def _libc() -> ctypes.CDLL | None:
    with contextlib.suppress(OSError):
        return ctypes.CDLL(None, use_errno=True)
    return None


def die_with_parent() -> None:
    """In a freshly forked child (a preexec_fn): SIGKILL this process when its parent exits."""
    libc = _libc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def watch_parent(parent_pid: int, period_s: float = WATCH_PERIOD_S) -> None:
    """In a forked child: exit as soon as `parent_pid` is no longer this process's parent."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(period_s)
        os._exit(1)  # its own children (p2pd) follow through their parent-death signal

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _spawning_with(preexec: Callable[[], None]):
    """asyncio's create_subprocess_exec, with `preexec` run in each child before exec."""
    spawn = asyncio.subprocess.create_subprocess_exec

    async def spawn_bound(*args: object, **kwargs: object) -> asyncio.subprocess.Process:
        kwargs.setdefault("preexec_fn", preexec)
        return await spawn(*args, **kwargs)

    return spawn_bound


def children_die_with_this_process() -> None:
    """Every program this process starts through asyncio from now on gets PR_SET_PDEATHSIG:
    hivemind starts p2pd with asyncio.subprocess.create_subprocess_exec."""
    asyncio.subprocess.create_subprocess_exec = _spawning_with(die_with_parent)


def _bound_and_deaf_to_ctrl_c() -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Go program keeps an inherited SIG_IGN across exec


@contextlib.contextmanager
def daemons_bound_here() -> Iterator[None]:
    """For a libp2p node started in this process (not in a DHT child, whose p2pd inherits its
    SIG_IGN): the p2pd it spawns inside this block dies with the spawning thread, and ignores the
    Ctrl-C a terminal sends to the whole process group, so the node stays up while this process
    drains, and goes when it is done."""
    spawn = asyncio.subprocess.create_subprocess_exec
    asyncio.subprocess.create_subprocess_exec = _spawning_with(_bound_and_deaf_to_ctrl_c)
    try:
        yield
    finally:
        asyncio.subprocess.create_subprocess_exec = spawn
