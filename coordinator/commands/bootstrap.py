"""`moe-swarm bootstrap`: a standalone DHT node that peers and coordinators join, and, by
default, a circuit relay for peers nobody can dial (within --relay-* limits)."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from protos.plumbing.files import write_json_atomic
from protos.plumbing.p2p import RelayLimits

DEFAULTS = RelayLimits()


def add_bootstrap_args(b: argparse.ArgumentParser) -> None:
    b.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    b.add_argument("--port", type=int, default=0, help="TCP port (0 picks a free one)")
    b.add_argument("--ready-file", type=Path, default=None, help="write the multiaddrs here as JSON once up")
    b.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help="this node's libp2p identity (created if absent): its multiaddr survives restarts. Default: a fresh one",
    )
    b.add_argument(
        "--announce-host", default=None, help="the address others dial (a VPS's public IP); needs an explicit --port"
    )
    b.add_argument("--no-relay", action="store_true", help="do not relay for peers behind NAT")
    b.add_argument(
        "--relay-max-reservations",
        type=int,
        default=DEFAULTS.max_reservations,
        help=f"relayed peers this node keeps a slot for (default {DEFAULTS.max_reservations})",
    )
    b.add_argument(
        "--relay-max-circuits",
        type=int,
        default=DEFAULTS.max_circuits,
        help=f"open relayed connections per relayed peer (default {DEFAULTS.max_circuits})",
    )
    b.add_argument(
        "--relay-data-limit",
        type=int,
        default=DEFAULTS.data_bytes,
        help=f"bytes relayed per connection and direction before it is reset (default {DEFAULTS.data_bytes})",
    )
    b.add_argument(
        "--relay-duration",
        type=int,
        default=DEFAULTS.duration_s,
        help=f"seconds a relayed connection lasts before it is reset (default {DEFAULTS.duration_s})",
    )


def relay_limits(args: argparse.Namespace) -> RelayLimits | None:
    if args.no_relay:
        return None
    limits = RelayLimits(
        max_reservations=args.relay_max_reservations,
        max_circuits=args.relay_max_circuits,
        data_bytes=args.relay_data_limit,
        duration_s=args.relay_duration,
    )
    if min(limits.max_reservations, limits.max_circuits, limits.data_bytes, limits.duration_s) <= 0:
        raise ValueError("--relay-* limits must be positive (use --no-relay to relay for nobody)")
    return limits


def run_bootstrap(args: argparse.Namespace) -> int:
    from protos.plumbing.dht import start_dht
    from protos.plumbing.p2p import relay_service
    from protos.plumbing.reachability import serve_dial_back

    limits = relay_limits(args)
    extra = {}
    if args.key_file is not None:
        extra["identity_path"] = str(args.key_file)
    if args.announce_host:
        if not args.port:
            raise ValueError("--announce-host needs an explicit --port (the port others dial)")
        extra["announce_maddrs"] = [f"/ip4/{args.announce_host}/tcp/{args.port}"]
    if limits is not None:
        extra["force_reachability"] = "public"  # a relay others reach: don't wait for AutoNAT to agree
    # the bootstrap stores records too: it must refuse forged ones like every other node
    with relay_service(limits):
        dht = start_dht(host=args.host, port=args.port, **extra)
    serve_dial_back(dht)  # joining peers ask us to dial their endpoint before they announce it
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    print("DHT bootstrap node is up. Join it with:", flush=True)
    print("  --initial-peers " + " ".join(maddrs), flush=True)
    if limits is not None:
        print(f"relaying for peers behind NAT: {limits}", flush=True)
    if args.ready_file:
        write_json_atomic(args.ready_file, {"maddrs": maddrs, "pid": os.getpid(), "relay": limits is not None})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    dht.shutdown()
    return 0
