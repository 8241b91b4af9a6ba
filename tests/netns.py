"""A small internet made of Linux network namespaces, for tests of relayed peers.

    inet   the internet: bootstrap/relay nodes and directly reachable peers, all on 10.77.1.1
           (its address towards home; 10.77.2.1 faces the coordinator; both reach either, as
           addresses of the namespace itself); it forwards nothing
    home   a peer behind NAT: it dials out from 10.77.1.2, but serves on its LAN address
           10.77.9.2, to which nobody outside has a route (what a home router's NAT does)
    coord  a coordinator: 10.77.2.2; it reaches the internet, never home

Every namespace is created by the test and deleted at the end, on failure too (the veth
pairs go with them). Nothing in the host's own namespace changes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

INET_HOME, HOME, HOME_LAN = "10.77.1.1", "10.77.1.2", "10.77.9.2"
INET_COORD, COORD = "10.77.2.1", "10.77.2.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass(frozen=True)
class Topology:
    inet: str
    home: str
    coord: str
    home_veth: str = "vhome"  # the inet end of the link to home (where a capture at the relay listens)
    coord_veth: str = "vcoord"

    def names(self) -> tuple[str, str, str]:
        return self.inet, self.home, self.coord


def unavailable() -> str | None:
    """Why namespaces can't be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is missing"
    name = f"moeprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"cannot create a network namespace: {getattr(e, 'stderr', b'') or e}"
    _ip("netns", "del", name)
    return None


def _build(t: Topology) -> None:
    for ns in t.names():
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
    for veth, ns, inet_addr, addr in (
        (t.home_veth, t.home, INET_HOME, HOME),
        (t.coord_veth, t.coord, INET_COORD, COORD),
    ):
        _ip("link", "add", veth, "netns", t.inet, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", t.inet, "addr", "add", f"{inet_addr}/24", "dev", veth)
        _ip("-n", t.inet, "link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "via", inet_addr)
    _ip("-n", t.home, "addr", "add", f"{HOME_LAN}/32", "dev", "lo")


@contextlib.contextmanager
def topology(tag: str = "") -> Iterator[Topology]:
    suffix = f"{tag}{os.getpid()}"
    t = Topology(f"moeinet{suffix}", f"moehome{suffix}", f"moecoord{suffix}")
    try:
        _build(t)
        yield t
    finally:
        for ns in t.names():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def run_in(ns: str, *argv: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
