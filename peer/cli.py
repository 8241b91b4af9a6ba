"""moe-peer: host experts for the swarm.

moe-peer serve --checkpoint DIR --experts 0:0-3,1:* --initial-peers /ip4/.../p2p/...
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from protos import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_QUEUE_ROWS, DEFAULT_MAX_ROWS, __version__, tensors, toy_model
from protos.expert_spec import format_expert_spec
from protos.plumbing.cliconfig import install as with_config
from protos.plumbing.dht import SwarmJoinError
from protos.plumbing.files import write_json_atomic
from protos.records import PeerRecord, PeerState
from protos.toy_model import ToyConfig

from .experts import HostedExperts
from .placement import choose_experts, parse_bytes
from .selfbench import cached_throughput

if TYPE_CHECKING:
    from .hf_experts import HFHostedExperts
    from .impair import Impairment

log = logging.getLogger("moe-peer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-peer", description="Host experts of a MoE model for the swarm.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve experts over gRPC and announce them in the DHT")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="Hugging Face MoE checkpoint folder (config.json + safetensors)")
    src.add_argument("--checkpoint", type=Path, help="moe-swarm toy checkpoint folder (moe_swarm.json + safetensors)")
    src.add_argument("--seed", type=int, help="build the toy model from this seed instead of a checkpoint")
    s.add_argument("--layers", type=int, default=2, help="with --seed: number of MoE layers")
    s.add_argument("--num-experts", type=int, default=8, help="with --seed: experts per layer")
    s.add_argument("--hidden", type=int, default=256, help="with --seed: hidden size")
    s.add_argument("--ffn", type=int, default=512, help="with --seed: expert FFN size")
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


def load_experts(args: argparse.Namespace, device: torch.device) -> HostedExperts | HFHostedExperts:
    if args.model is not None:
        from .hf_experts import HFHostedExperts

        dtype = tensors.dtype_from_name(args.dtype) if args.dtype else None
        return HFHostedExperts.from_checkpoint(args.model, args.experts, device, dtype)
    if args.checkpoint is not None:
        return HostedExperts.from_checkpoint(args.checkpoint, args.experts, device)
    return HostedExperts.from_seed(toy_config(args), args.seed, args.experts, device)


def toy_config(args: argparse.Namespace) -> ToyConfig:
    return ToyConfig(
        num_layers=args.layers,
        num_experts=args.num_experts,
        hidden_dim=args.hidden,
        ffn_dim=args.ffn,
        dtype=args.dtype or "float32",
    )


def describe_model(args: argparse.Namespace) -> tuple[str, list[tuple[int, int]], int]:
    """(model id, every (layer, expert), bytes of one expert at the serving dtype), reading no expert but one."""
    if args.model is not None:
        from protos.hf_checkpoint import HFCheckpoint, load_manifest

        ckpt = HFCheckpoint(args.model)
        one = ckpt.read_expert(*min(ckpt.experts))
        itemsize = tensors.dtype_from_name(args.dtype).itemsize if args.dtype else None
        nbytes = sum(t.numel() * (itemsize or t.element_size()) for t in one.values())
        return load_manifest(ckpt).model_id, sorted(ckpt.experts), nbytes
    if args.checkpoint is not None:
        manifest = toy_model.read_manifest(args.checkpoint)
    else:
        config = toy_config(args)
        manifest = toy_model.manifest_for(config, toy_model.build_state_dict(config, args.seed))
    cfg = manifest.config
    pairs = [(layer, e) for layer in range(cfg.num_layers) for e in range(cfg.num_experts)]
    return manifest.model_id, pairs, 3 * cfg.hidden_dim * cfg.ffn_dim * cfg.torch_dtype.itemsize


def impairment(args: argparse.Namespace) -> Impairment | None:
    from .impair import Impairment

    imp = Impairment(args.sim_slowdown, args.sim_latency_ms, args.sim_jitter_ms, args.sim_loss, args.sim_seed)
    return imp if imp.active else None


def security(args: argparse.Namespace) -> dict:
    """The servicer's security settings; file and value errors surface before anything starts."""
    from protos.envelope import Identity

    from .sessions import RateLimiter, read_allowlist

    if args.key_file is not None:
        identity = Identity.load_or_create(args.key_file)
    else:
        identity = Identity.generate()
        log.info("using a fresh identity (pass --key-file to keep one across restarts)")
    limiter = None
    if args.rate_limit is not None:
        limiter = RateLimiter(args.rate_limit, args.rate_burst or max(args.rate_limit, args.max_rows))
    allow = read_allowlist(args.allow_clients) if args.allow_clients is not None else None
    return {
        "identity": identity,
        "allow_clients": allow,
        "rate_limiter": limiter,
        "allow_plaintext": args.allow_plaintext,
    }


def parse_cpu_list(text: str) -> frozenset[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6} (the notation of taskset and /sys/devices/system/cpu)."""
    cpus: set[int] = set()
    for item in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = item.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"bad CPU list item {item!r}: expected N or A-B") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {item!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"CPU list {text!r} names no CPU")
    return frozenset(cpus)


def split_cpus(text: str) -> frozenset[int]:
    """Pin this process's threads (and every thread and process it starts from now on) to the
    allowed CPUs outside `text`; return `text`'s CPUs for the compute thread."""
    compute = parse_cpu_list(text)
    allowed = os.sched_getaffinity(0)
    if not compute <= allowed:
        missing, have = sorted(compute - allowed), sorted(allowed)
        raise ValueError(f"--compute-cpus {text}: CPUs {missing} are not available to this process (it has {have})")
    host = allowed - compute
    os.sched_setaffinity(0, host or allowed)  # threads inherit their creator's CPUs
    return compute


def release_freed_memory() -> None:
    """Hand the heap that loading freed (read buffers, digests) back to the OS: glibc keeps it
    otherwise, and a peer's footprint should be its experts, not its load history."""
    import contextlib
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim this way
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def parse_pairs(uids: list[str]) -> list[tuple[int, int]]:
    from protos.records import parse_expert_uid

    return sorted(parse_expert_uid(u)[1:] for u in uids)


async def recheck_placement(args, device, servicer, announcer, coverage, pairs, hosted, expert_bytes, budget) -> None:
    """Every --placement-check seconds: move to a better set when two checks in a row find one
    (hysteresis), draining first so no request fails."""
    from .placement import better_placement

    streak = 0
    while True:
        await asyncio.sleep(args.placement_check * random.uniform(0.8, 1.2))  # jitter: peers don't move in step
        try:
            others = await coverage()
        except Exception as e:
            log.warning("placement check could not read the DHT: %s", e)
            continue
        proposal = better_placement(pairs, others, hosted, expert_bytes, budget)
        streak = streak + 1 if proposal else 0
        if streak < 2:
            continue
        streak = 0
        before, after = format_expert_spec(hosted), format_expert_spec(proposal)
        log.info("re-placing: %s -> %s (weakest coverage improves)", before, after)
        servicer.state = PeerState.DRAINING
        await announcer.announce()  # coordinators stop choosing us; in-flight work finishes
        deadline = time.monotonic() + args.drain_timeout
        while servicer.load and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        args.experts = format_expert_spec(proposal)
        experts = await asyncio.to_thread(load_experts, args, device)
        release_freed_memory()
        retired = sorted(set(announcer.uids) - set(experts.uids))
        servicer.replace_experts(experts)
        announcer.uids = list(experts.uids)
        await announcer.withdraw(retired)
        servicer.state = PeerState.ONLINE
        await announcer.announce()
        hosted = proposal
        log.info("now hosting %s", args.experts)


async def require_reachable(dht, args: argparse.Namespace, endpoint: str, port: int) -> None:
    """Refuse to announce an address other nodes cannot dial, saying what to change."""
    from protos.plumbing.reachability import check_reachable

    ok, detail = await check_reachable(dht, args.initial_peers, endpoint)
    if ok is None:
        log.warning("could not verify that %s is reachable (%s); announcing anyway", endpoint, detail)
        return
    if not ok:
        hint = (
            "bind a public interface with --host 0.0.0.0 and announce --announce-host <this machine's address>"
            if args.host.startswith("127.")
            else f"forward TCP port {args.announce_port or port} to this machine (router/firewall) and pass "
            f"--announce-host <your public address> (and --announce-port if the forwarded port differs)"
        )
        raise ConnectionError(
            f"other nodes cannot reach this peer at {endpoint} ({detail}); announcing it would send coordinators "
            f"to a dead address. To fix: {hint}. (--skip-reachability-check announces anyway.)"
        )


async def serve(args: argparse.Namespace) -> None:
    impair = impairment(args)  # invalid values fail before anything starts
    secure = security(args)
    identity = secure["identity"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    auto = args.experts == "auto"
    if auto:
        model_id, pairs, expert_bytes = describe_model(args)
        if not args.memory_budget:
            raise ValueError("--experts auto needs --memory-budget (e.g. 8GiB)")
        budget = parse_bytes(args.memory_budget)
    else:
        experts = load_experts(args, device)  # first: configuration errors surface before anything starts

    from hivemind.utils import get_dht_time

    from protos.plumbing.dht import start_dht
    from protos.plumbing.reachability import serve_dial_back
    from protos.records import count_serving, expert_uid, fetch_latest
    from protos.validation import owner_subkey

    from .announce import Announcer
    from .server import ExpertServicer, start_server

    # Ctrl-C in a terminal signals the whole process group: p2pd (a Go program) keeps an
    # inherited SIG_IGN, so it stays up until we have drained and withdrawn our records
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rsa = identity.rsa_key()
    dht = start_dht(args.initial_peers, host=args.host, port=args.dht_port, rsa_key=rsa)
    peer_id = identity.fingerprint
    owner = owner_subkey(rsa)

    async def coverage() -> dict[tuple[int, int], int]:
        """Serving replicas per expert, not counting this peer."""
        raw = await fetch_latest(dht, [expert_uid(model_id, layer, e) for layer, e in pairs])
        others = {uid: {sk: v for sk, v in subs.items() if sk != owner} for uid, subs in raw.items()}
        counts = count_serving(others, get_dht_time())
        return {(layer, e): counts.get(expert_uid(model_id, layer, e), 0) for layer, e in pairs}

    if auto:
        await asyncio.sleep(random.uniform(0, args.placement_delay))
        replicas = await coverage()
        args.experts = format_expert_spec(choose_experts(pairs, replicas, expert_bytes, budget))
        log.info("auto placement: hosting %s (coverage before: %s)", args.experts, sorted(set(replicas.values())))
        experts = load_experts(args, device)
    release_freed_memory()
    throughput = cached_throughput(experts)
    metrics = metrics_port = None
    if args.metrics_port is not None:
        from .metrics import PeerMetrics

        metrics = PeerMetrics()
        metrics_port = metrics.serve(args.metrics_port, args.metrics_host)
        log.info("metrics at http://%s:%d/metrics", args.metrics_host, metrics_port)
    servicer = ExpertServicer(
        experts,
        peer_id=peer_id,
        max_rows=args.max_rows,
        max_message_bytes=args.max_message_bytes,
        max_queue_rows=args.max_queue_rows,
        max_batch_rows=args.max_batch_rows,
        batch_wait_ms=args.batch_wait_ms,
        impairment=impair,
        **secure,
        corrupt_outputs=args.sim_corrupt,
        metrics=metrics,
        compute_cpus=args.compute_cpus,
    )
    server, port = await start_server(servicer, args.host, args.port, args.max_message_bytes)
    endpoint = f"{args.announce_host or args.host}:{args.announce_port or port}"

    def record() -> PeerRecord:
        return PeerRecord.signed(
            identity,
            owner,
            endpoint=endpoint,
            state=servicer.state,
            load=servicer.load,
            throughput=throughput,
            device=str(device),
            version=__version__,
        )

    announcer = Announcer(dht, experts.uids, record, owner, period=args.announce_period)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        serve_dial_back(dht)  # answer other peers' reachability checks
        if args.initial_peers and not args.skip_reachability_check:
            await require_reachable(dht, args, endpoint, port)
        servicer.state = PeerState.ONLINE
        await announcer.announce()
        announcer.start()
        log.info(
            "serving %d experts of %s at %s (peer %s, %s, %.0f tokens/s/expert)",
            len(experts.uids),
            experts.model_id,
            endpoint,
            peer_id,
            device,
            throughput,
        )
        if args.ready_file:
            write_json_atomic(
                args.ready_file,
                {
                    "endpoint": endpoint,
                    "peer_id": peer_id,
                    "pid": os.getpid(),
                    "model_id": experts.model_id,
                    "experts": experts.uids,
                    "metrics_port": metrics_port,
                },
            )
        if auto and args.placement_check > 0:
            hosted = parse_pairs(experts.uids)
            mover = asyncio.create_task(
                recheck_placement(args, device, servicer, announcer, coverage, pairs, hosted, expert_bytes, budget)
            )
            stop_task = asyncio.create_task(stop.wait())
            await asyncio.wait([mover, stop_task], return_when=asyncio.FIRST_COMPLETED)
            mover.cancel()
            await asyncio.gather(mover, return_exceptions=True)
        await stop.wait()
        log.info("leaving: draining in-flight requests (up to %.0fs)", args.drain_timeout)
        servicer.state = PeerState.DRAINING
        await announcer.stop_refreshing()
        await announcer.announce()  # readers stop choosing us while in-flight work finishes
        await server.stop(grace=args.drain_timeout)
        await announcer.withdraw()
        log.info("withdrawn from the DHT; served %d requests", servicer.served_requests)
    finally:
        await server.stop(grace=None)
        servicer.close()
        dht.shutdown()


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
    if args.threads:
        torch.set_num_threads(args.threads)
    import uvloop

    try:
        if args.compute_cpus is not None:
            args.compute_cpus = split_cpus(args.compute_cpus)
            if not args.threads:  # one torch thread per compute CPU, not per CPU of the host
                torch.set_num_threads(len(args.compute_cpus))
        uvloop.run(serve(args))
    except (ValueError, FileNotFoundError, OSError, ImportError, SwarmJoinError) as e:
        print(f"moe-peer: error: {e}", file=sys.stderr)
        return 2
    return 0
