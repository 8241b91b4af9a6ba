"""The baseline `moe-swarm bench layer --compare-hivemind` measures against: hivemind's own
`Server` with `ffn` experts on 127.0.0.1 (this module run as a process; it writes a ready
file), and hivemind's `RemoteMixtureOfExperts` calling it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from protos.plumbing.files import write_json_atomic

if TYPE_CHECKING:
    from torch import nn

    from coordinator.sim.local_swarm import LocalSwarm


@contextlib.contextmanager
def hivemind_layer(swarm: LocalSwarm, experts: int, hidden: int, k: int) -> Iterator[nn.Module]:
    """hivemind's RemoteMixtureOfExperts over a hivemind Server with `experts` ffn experts
    (another process on this swarm's bootstrap), ready to call."""
    from hivemind import DHT
    from hivemind.moe.client.moe import RemoteMixtureOfExperts
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    from protos.plumbing.dht import fork_safe_gc

    server = ["-m", "coordinator.bench.hivemind_baseline", "--experts", str(experts), "--hidden", str(hidden)]
    swarm._spawn("hivemind-server", [*server, "--initial-peers", *swarm.initial_peers])
    with fork_safe_gc():  # in case this process has used gRPC already (protos/plumbing/dht.py)
        dht = DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield RemoteMixtureOfExperts(
            in_features=hidden, grid_size=(experts,), dht=dht, uid_prefix="expert.", k_best=k, forward_timeout=30
        )
    finally:
        # hivemind's client keeps a P2P replica on its worker loop; close it there, or its
        # destructor fails noisily at interpreter exit
        if dht._p2p_replica is not None:
            RemoteExpertWorker.run_coroutine(dht._p2p_replica.shutdown())
        dht.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator.bench.hivemind_baseline")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args(argv)

    from hivemind.moe.server import Server

    server = Server.create(
        expert_uids=[f"expert.{i}" for i in range(args.experts)],
        expert_cls="ffn",
        hidden_dim=args.hidden,
        initial_peers=args.initial_peers,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        device="cpu",
        start=True,
    )
    server.ready.wait()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    write_json_atomic(args.ready_file, {"pid": os.getpid()})
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
