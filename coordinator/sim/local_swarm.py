"""Start a swarm of real processes on 127.0.0.1: a DHT bootstrap node and peers.

Used by the demo, the benchmarks and the integration tests. Every process runs in its
own session so its helpers (hivemind's p2pd) die with it; everything started is stopped
on close, by process group, even after errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class LaunchError(RuntimeError):
    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for processes that must know theirs up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    info: dict = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)  # what it was started with: a restart reuses it

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int, group: bool = False) -> None:
        """Signal the process, or its whole group (it and its p2pd) to emulate a machine dying."""
        if self.alive():
            (os.killpg if group else os.kill)(self.pid, sig)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalSwarm:
    def __init__(self, workdir: str | Path | None = None, start_timeout: float = 90.0, rtt_ms: float = 0.0) -> None:
        """`rtt_ms` > 0 puts each peer behind a delay link (coordinator/sim/delay_link.py) with that round-trip
        time: peers announce the link's port, so every gRPC call to them pays it; DHT traffic does not."""
        self.rtt_ms = rtt_ms
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="moe-swarm-")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.processes: list[Process] = []
        self.initial_peers: list[str] = []
        self.netns: dict[str, str] = {}  # process name -> network namespace it runs in (tests' topologies)

    def _spawn(self, name: str, argv: list[str]) -> Process:
        proc = self._launch(name, argv)
        self._wait_ready(proc)
        return proc

    def _ready_path(self, name: str) -> Path:
        return self.workdir / f"{name}.ready.json"

    def _launch(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        ready = self._ready_path(name)
        ready.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "ab") as log:  # a restarted process appends to its predecessor's log
            wrap = ["ip", "netns", "exec", self.netns[name]] if name in self.netns else []
            popen = subprocess.Popen(
                [*wrap, sys.executable, *argv, "--ready-file", str(ready)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        proc = Process(name, popen, log_path, argv=list(argv))
        self.processes.append(proc)
        return proc

    def poll_ready(self, proc: Process) -> bool:
        """Non-blocking: True (and `proc.info` set) once it wrote its ready file; LaunchError if it died first."""
        if proc.info:
            return True
        ready = self._ready_path(proc.name)
        if ready.exists():
            proc.info = json.loads(ready.read_text())
            return True
        if not proc.alive():
            raise LaunchError(
                f"{proc.name} exited with {proc.popen.returncode} before it was ready:\n{proc.log_tail()}"
            )
        return False

    def _wait_ready(self, proc: Process) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not self.poll_ready(proc):
            if time.monotonic() > deadline:
                raise LaunchError(f"{proc.name} not ready after {self.start_timeout}s:\n{proc.log_tail()}")
            time.sleep(0.05)

    def start_processes(self, argvs: dict[str, list[str]]) -> list[Process]:
        """Commands that take --ready-file (e.g. `-m coordinator api ...`), by name: started together, then awaited."""
        procs = [self._launch(name, argv) for name, argv in argvs.items()]
        for proc in procs:
            self._wait_ready(proc)
        return procs

    def start_bootstrap(self, *args: str) -> Process:
        proc = self._spawn("bootstrap", ["-m", "coordinator", "bootstrap", *args])
        self.initial_peers = proc.info["maddrs"]
        return proc

    def start_peer(self, name: str, *peer_args: str) -> Process:
        return self.start_peers({name: list(peer_args)})[0]

    def start_peers(self, peers: dict[str, list[str]], env: dict[str, dict[str, str]] | None = None) -> list[Process]:
        """Start several peers at once (their imports and DHT joins overlap), then wait for all.
        `env`: extra environment variables by peer name."""
        if not self.initial_peers:
            raise LaunchError("start the bootstrap node before peers")
        env = env or {}
        procs = [self.launch_peer(name, *args, env=env.get(name)) for name, args in peers.items()]
        for proc in procs:
            self._wait_ready(proc)
        return procs

    def launch_peer(self, name: str, *peer_args: str, env: dict[str, str] | None = None) -> Process:
        """Start a peer without waiting for it (see `poll_ready`): the caller goes on meanwhile."""
        if not self.initial_peers:
            raise LaunchError("start the bootstrap node before peers")
        argv = ["-m", "peer", "serve", *peer_args, "--initial-peers", *self.initial_peers]
        if self.rtt_ms > 0:
            argv += self._delay_link_args(name)
        return self._launch(name, argv, env)

    def _delay_link_args(self, name: str) -> list[str]:
        """Start `name`'s delay link in front of a port picked for it; the peer flags that bind and announce them."""
        port = free_port()
        link = self._spawn(
            f"{name}-link",
            ["-m", "coordinator.sim.delay_link", "--target", str(port), "--one-way-ms", str(self.rtt_ms / 2)],
        )
        link_port = link.info["endpoint"].rpartition(":")[2]
        return ["--port", str(port), "--announce-port", link_port]

    def relaunch(self, proc: Process) -> Process:
        """Start a new incarnation of `proc` with its arguments (a fresh DHT identity and port); no wait.
        The old one may still be shutting down: it stays tracked until stopped or closed."""
        return self._launch(proc.name, proc.argv)

    def stop(self, proc: Process, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Signal a process (group) and wait; SIGKILL if it does not exit in time."""
        return self.stop_many([proc], sig, timeout)[0]

    def stop_many(self, procs: list[Process], sig: int = signal.SIGTERM, timeout: float = 30.0) -> list[int | None]:
        """Signal all first so they leave in parallel, then wait for each."""
        for proc in procs:
            proc.signal(sig, group=sig == signal.SIGKILL)
        deadline = time.monotonic() + timeout  # one deadline for all: they leave in parallel
        codes = [self._reap(proc, max(deadline - time.monotonic(), 0.0)) for proc in procs]
        self.processes = [p for p in self.processes if p not in procs]
        return codes

    def _reap(self, proc: Process, timeout: float) -> int | None:
        try:
            return proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.signal(signal.SIGKILL, group=True)
            return proc.popen.wait(10)
        finally:
            # reap anything left in its group (e.g. p2pd) once the leader is gone
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def close(self) -> None:
        self.stop_many(list(reversed(self.processes)), signal.SIGTERM, timeout=15)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
