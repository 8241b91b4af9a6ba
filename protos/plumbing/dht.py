"""Starting this swarm's DHT nodes: one factory for bootstrap, peers and coordinators.

Every node runs the same record validators (protos/validation.py). Each node is a forked
child, and forking safely from a process that has used gRPC needs care:

hivemind starts each DHT node by fork(). The child inherits every Python object of the
parent, garbage included. If the child's garbage collector frees an inherited grpc.aio
object (a closed channel's or stream's call still in a reference cycle), its finaliser
calls into a gRPC core whose threads exist only in the parent: the child spins forever
(seen: `gc_collect_main -> cygrpc -> Thread.join`) or crashes. So the collector is off
from just before the fork until the child has moved everything it inherited to the
generation that is never collected (`gc.freeze()`); both processes then collect their own
new garbage as usual.

A DHT child and its p2pd die with the process that forked it (lifeline.py).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from .lifeline import children_die_with_this_process, watch_parent

if TYPE_CHECKING:
    from hivemind import DHT
    from hivemind.dht.node import DHTNode
    from hivemind.utils.crypto import RSAPrivateKey

# while a fork_safe_gc() block runs: whether its forked children turn the collector back on
# once they have frozen what they inherited (None: not forking from such a block), and the
# forking process (its DHT children die with it: lifeline.py)
_child_gc: bool | None = None
_forking_pid = 0


def _after_fork_in_child() -> None:
    global _child_gc
    if _child_gc is not None:
        gc.freeze()
        if _child_gc:
            gc.enable()
        _child_gc = None  # this child's own forks (p2pd's, before exec) are not DHT nodes
        watch_parent(_forking_pid)
        children_die_with_this_process()


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def fork_safe_gc() -> Iterator[None]:
    """Around code that forks (a hivemind DHT start) in a process that has used gRPC."""
    global _child_gc, _forking_pid
    enabled = gc.isenabled()
    gc.disable()  # also in the child until its at-fork hook has frozen what it inherited
    _child_gc, _forking_pid = enabled, os.getpid()
    try:
        yield
    finally:
        _child_gc = None
        if enabled:
            gc.enable()


class SwarmJoinError(RuntimeError):
    """The DHT node could not start or reach the swarm; the message is one line for the user."""


def _require_free(host: str, port: int) -> None:
    """libp2p's daemon binds with SO_REUSEPORT, so a second node on a taken port starts without
    a word and the two share its connections: refuse before starting instead."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a listener conflicts, TIME_WAIT does not
        try:
            s.bind((host, port))
        except OSError as e:
            raise SwarmJoinError(f"cannot start a DHT node on {host}:{port}: {e.strerror}; pick another port") from None


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    client_mode: bool = False,
    rsa_key: RSAPrivateKey | None = None,
    wait: bool = True,
    **kwargs,
) -> DHT:
    """A running DHT node with this swarm's validators. `client_mode` nodes read records and
    store nobody's (coordinators); `rsa_key` signs this node's own records (peers). With
    `wait=False` it returns as soon as the node's process is forked, and `joined()` waits for
    it: a peer loads its experts meanwhile."""
    from hivemind import DHT

    from protos.validation import dht_validators

    if port:
        _require_free(host, port)
    with fork_safe_gc():  # the node is a forked child: see the module's docstring
        dht = DHT(
            initial_peers=list(initial_peers),
            client_mode=client_mode,
            host_maddrs=[f"/ip4/{host}/tcp/{port}"],
            record_validators=dht_validators(rsa_key),
            start=True,
            await_ready=False,
            **kwargs,
        )
    return joined(dht, initial_peers, host, port) if wait else dht


def joined(dht: DHT, initial_peers: Sequence[str] = (), host: str = "127.0.0.1", port: int = 0) -> DHT:
    """`dht` (started with these arguments) once its node runs and, given initial peers, has
    reached the swarm; SwarmJoinError (one line) if it could not, its process stopped."""
    from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

    try:
        dht.wait_until_ready()
    except P2PDaemonError as e:
        dht.shutdown()
        what = "join the swarm through --initial-peers" if initial_peers else f"start a DHT node on {host}:{port}"
        raise SwarmJoinError(f"cannot {what}: {str(e).strip().splitlines()[-1]}") from None
    return dht


async def _get_latest(dht: DHT, node: DHTNode, keys: Sequence[str]) -> dict[str, dict[str, tuple[object, float]]]:
    # runs inside the DHT process; returns plain picklable data
    found = await node.get_many(list(keys), sufficient_expiration_time=float("inf"))
    out: dict[str, dict[str, tuple[object, float]]] = {}
    for key, entry in found.items():
        if entry is not None and isinstance(entry.value, dict):  # a dictionary key: subkey -> value
            out[key] = {sk: (v.value, v.expiration_time) for sk, v in entry.value.items()}
    return out


async def fetch_latest(dht: DHT, keys: Sequence[str]) -> dict[str, dict[str, tuple[object, float]]]:
    """uid -> {peer id: (raw record, expiration)}, the freshest the DHT holds (untrusted: parse
    each record with PeerRecord.from_dict)."""
    return await dht.run_coroutine(functools.partial(_get_latest, keys=list(keys)), return_future=True)
