"""A hivemind MoE server process: the baseline `moe-swarm bench layer --compare-hivemind` measures against.

Runs hivemind's own `Server` with `ffn` experts on 127.0.0.1 and writes a ready file.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from protos.plumbing.files import write_json_atomic


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
