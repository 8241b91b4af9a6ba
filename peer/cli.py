"""moe-peer: host experts for the swarm.

moe-peer serve --checkpoint DIR --experts 0:0-3,1:* --initial-peers /ip4/.../p2p/...

This module only maps the command line (and MOE_PEER_* variables, and --config files) to a
PeerConfig; peer/node.py runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from protos.limits import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_QUEUE_ROWS, DEFAULT_MAX_ROWS
from protos.plumbing.cliconfig import install as with_config
from protos.plumbing.dht import SwarmJoinError

from .config import PeerConfig
from .host import parse_cpu_list


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-peer", description="Host experts of a MoE model for the swarm.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve experts over gRPC and announce them in the DHT")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model",
        help="Hugging Face MoE checkpoint: a Hub repo id (org/name; only this peer's experts are downloaded) "
        "or a local folder (config.json + safetensors)",
    )
    src.add_argument("--checkpoint", type=Path, help="moe-swarm toy checkpoint folder (moe_swarm.json + safetensors)")
    src.add_argument("--seed", type=int, help="build the toy model from this seed instead of a checkpoint")
    s.add_argument("--layers", type=int, default=2, help="with --seed: number of MoE layers")
    s.add_argument("--num-experts", type=int, default=8, help="with --seed: experts per layer")
    s.add_argument("--hidden", type=int, default=256, help="with --seed: hidden size")
    s.add_argument("--ffn", type=int, default=512, help="with --seed: expert FFN size")
    s.add_argument("--revision", help="with a Hub repo id: branch, tag or commit (default: main), pinned to a commit")
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="with a Hub repo id: print what this peer would download for --experts (files, spans, bytes) and exit",
    )
    s.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: the checkpoint's; float32 with --seed)",
    )
    s.add_argument(
        "--experts",
        default="*",
        help="which experts to host: LAYERS:EXPERTS items, e.g. '0:0-3,1:*', or 'auto' (the least-covered "
        "experts of the swarm that fit --memory-budget)",
    )
    s.add_argument(
        "--memory-budget", default=None, help="with --experts auto: bytes of expert weights to host, e.g. 8GiB"
    )
    s.add_argument(
        "--placement-delay",
        type=float,
        default=2.0,
        help="with --experts auto: wait up to this many seconds (random) before reading the swarm's coverage",
    )
    s.add_argument(
        "--placement-check",
        type=float,
        default=60.0,
        help="with --experts auto: re-read coverage this often (s); move (draining first) only when another set "
        "raises the swarm's weakest coverage on two checks in a row. 0: never move",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind the gRPC server (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=0, help="gRPC port (0 picks a free one)")
    s.add_argument("--announce-host", default=None, help="address others dial to reach this peer (default --host)")
    s.add_argument("--dht-port", type=int, default=0, help="TCP port of this peer's DHT node (0 picks one)")
    s.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of DHT nodes to join")
    s.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    s.add_argument(
        "--compute-cpus",
        default=None,
        help="CPUs for the expert math only, e.g. 0-3 or 0,2: the network, crypto and DHT run on the other "
        "allowed CPUs, so they never preempt the computation (CPU peers on a many-core host)",
    )
    s.add_argument("--announce-period", type=float, default=10.0, help="seconds between DHT refreshes")
    s.add_argument("--drain-timeout", type=float, default=10.0, help="seconds in-flight work may finish on leave")
    s.add_argument(
        "--max-batch-rows",
        type=int,
        default=4096,
        help="most token rows the device computes in one merged batch of requests",
    )
    s.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="wait this long for more requests before computing (0: batch only what is queued)",
    )
    s.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="most token rows per request")
    s.add_argument(
        "--max-queue-rows",
        type=int,
        default=DEFAULT_MAX_QUEUE_ROWS,
        help="most token rows admitted at once; beyond it requests get RESOURCE_EXHAUSTED at once",
    )
    s.add_argument(
        "--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, help="largest gRPC message accepted or sent"
    )
    s.add_argument(
        "--ready-file", type=Path, default=None, help="write endpoint/peer id JSON here once serving (for launchers)"
    )
    sec = s.add_argument_group("security")
    sec.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help="this peer's identity (Ed25519 + X25519 + DHT signing key; created mode 0600 if absent). "
        "Default: a fresh identity each run",
    )
    sec.add_argument(
        "--allow-clients", type=Path, default=None, help="private peer: file of coordinator public keys (hex per line)"
    )
    sec.add_argument(
        "--rate-limit", type=float, default=None, help="public peer: token rows/s each client may send (default: none)"
    )
    sec.add_argument("--rate-burst", type=float, default=None, help="with --rate-limit: burst size in rows")
    sec.add_argument(
        "--address-rate-limit",
        type=float,
        default=None,
        help="token rows/s each client address may send, whatever identities it uses (default: 4 x --rate-limit)",
    )
    sec.add_argument(
        "--request-memory",
        default=None,
        help="bytes of requests being received at once, all callers together (default 1GiB): with the largest "
        "valid request it sets how many calls run at once, a quarter of them per address",
    )
    sec.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="also take unsealed requests (benchmarks, trusted networks): activations then cross the wire in clear",
    )
    s.add_argument("--announce-port", type=int, default=None, help="port others dial (default: the bound port)")
    s.add_argument(
        "--skip-reachability-check",
        action="store_true",
        help="announce without first asking another DHT node to dial our endpoint back",
    )
    s.add_argument(
        "--remeasure",
        action="store_true",
        help="measure expert throughput again instead of trusting the cache (it is re-measured anyway when over a "
        "week old or a quick probe disagrees with it)",
    )
    s.add_argument(
        "--relay",
        choices=("auto", "always", "never"),
        default="auto",
        help="serve through the swarm's circuit relays (its --initial-peers): auto (default) when other nodes "
        "cannot dial this peer, always, or never (refuse to start when unreachable)",
    )
    s.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks)"
    )
    s.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")
    sim = s.add_argument_group("simulation (moe-swarm simulate): impair this peer on purpose")
    sim.add_argument("--sim-slowdown", type=float, default=1.0, help="for simulation: compute takes N times as long")
    sim.add_argument("--sim-latency-ms", type=float, default=0.0, help="for simulation: added to every answer")
    sim.add_argument("--sim-jitter-ms", type=float, default=0.0, help="for simulation: +- uniform around the latency")
    sim.add_argument("--sim-loss", type=float, default=0.0, help="for simulation: probability a request fails")
    sim.add_argument(
        "--sim-corrupt",
        type=float,
        default=0.0,
        help="for tests of spot checks: scale outputs by (1 + this), signed as if correct (a cheating peer)",
    )
    sim.add_argument("--sim-seed", type=int, default=None, help="for simulation: seed of the impairment draws")
    s.add_argument("--log-level", default="INFO")
    k = sub.add_parser("keygen", help="create an identity key file (mode 0600) and print its public key")
    k.add_argument("path", type=Path, help="where to write the key file (refuses to overwrite)")
    return with_config(parser, "MOE_PEER")  # every flag also from MOE_PEER_* and --config FILE


def config_from_args(args: argparse.Namespace) -> PeerConfig:
    """The parsed `serve` flags as a PeerConfig: every flag is the field of the same name."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PeerConfig)}
    values["initial_peers"] = tuple(args.initial_peers)
    if args.compute_cpus is not None:
        values["compute_cpus"] = parse_cpu_list(args.compute_cpus)
    return PeerConfig(**values)


def keygen(path: Path) -> int:
    from protos.envelope import Identity

    try:
        identity = Identity.generate()
        identity.save(path)
    except FileExistsError:
        print(f"moe-peer: error: {path} exists; not overwriting an identity", file=sys.stderr)
        return 2
    print(f"wrote {path} (mode 0600)\npublic key: {identity.public.hex()}\npeer id: {identity.fingerprint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "keygen":
        return keygen(args.path)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    try:
        config = config_from_args(args)
        if args.dry_run:
            from .backends.load import dry_run

            print(dry_run(config))
            return 0
        from .node import serve  # the DHT, gRPC and torch stack: only for serve

        serve(config)
    except (ValueError, FileNotFoundError, OSError, ImportError, SwarmJoinError) as e:
        print(f"moe-peer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the node handles signals itself: nothing to drain yet
        print("moe-peer: interrupted while starting", file=sys.stderr)
        return 130
    return 0
