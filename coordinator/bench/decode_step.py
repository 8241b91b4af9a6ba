"""The decode step on its own: one token, one MoE layer call, and where its time goes.

    python -m coordinator.bench.decode_step --calls 300 [--rtt-ms 40] [--profile 25]

A toy layer (top-2 of 8 experts, hidden 64) with every expert on one peer, so one token
makes exactly one Forward. For each call it splits the layer call's time into the part on
this side around the RPC (gate, grouping, planning, scatter, the thread hop), the RPC
(sealing, the wire, the peer, opening) and the peer's own compute, as the peer reports it.
On loopback it then measures the floor in the same run: a bare gRPC echo of a message of
the request's size, through the same threads and processes (coordinator/bench/grpc_echo.py).
`--profile N` prints the N costliest functions of the coordinator's two threads (the caller
and the I/O loop), by their own CPU time, over the timed calls.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time
from collections.abc import Collection
from pathlib import Path

import torch

from coordinator.bench.grpc_echo import round_trip_ms
from coordinator.bench.harness import remote_layer, toy_swarm
from protos.toy_model import ToyConfig


def _median(values: Collection[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _profiles(client) -> tuple[cProfile.Profile, cProfile.Profile]:
    """One profiler for the calling thread, one started on the I/O loop's thread."""
    caller, loop_side = cProfile.Profile(), cProfile.Profile()

    async def start() -> None:
        loop_side.enable()

    client.io.run(start())
    caller.enable()
    return caller, loop_side


def _stop(client, caller: cProfile.Profile, loop_side: cProfile.Profile, top: int) -> str:
    caller.disable()

    async def stop() -> None:
        loop_side.disable()

    client.io.run(stop())
    out = io.StringIO()
    for name, prof in (("calling thread", caller), ("I/O loop thread", loop_side)):
        out.write(f"--- {name} (own time) ---\n")
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(calls: int, rtt_ms: float, profile: int) -> dict:
    config = ToyConfig(num_layers=1, num_experts=8, hidden_dim=64, ffn_dim=128, top_k=2)
    with toy_swarm(config, rtt_ms=rtt_ms) as bench:
        peer = bench.start_peer("--threads", "1").popen.pid
        with bench.client() as client:
            client.wait_for_experts()
            layer = remote_layer(bench.ckpt, client)
            x = torch.randn(1, config.hidden_dim, generator=torch.Generator().manual_seed(1))
            stats = client.dispatcher.stats
            with torch.inference_mode():
                for _ in range(30):  # warm-up: channel, stream, session, allocator
                    layer(x)
                stats.clear_samples()
                walls = []
                profilers = _profiles(client) if profile else None
                pids = (os.getpid(), peer)
                cpu = [_cpu_s(pid) for pid in pids]
                for _ in range(calls):
                    started = time.perf_counter()
                    layer(x)
                    walls.append((time.perf_counter() - started) * 1e3)
                cpu = [(_cpu_s(pid) - before) * 1e3 / calls for pid, before in zip(pids, cpu, strict=True)]
                text = _stop(client, *profilers, profile) if profilers else ""
            layer_ms, rpc_ms, peer_ms = stats.layer_ms[0], stats.rpc_ms, stats.peer_compute_ms  # the last SAMPLES_KEPT
        # the same hops with nothing of ours in them: a request's rows, its headers, tag and receipt
        bare_ms = round_trip_ms(bench.swarm, config.top_k * config.hidden_dim * 4 + 256, calls) if not rtt_ms else None
    result = {
        "rtt_ms": rtt_ms,
        "calls": calls,
        "step_ms": _median(walls),
        "dispatch_ms": _median(layer_ms),
        "rpc_ms": _median(rpc_ms),
        "peer_compute_ms": _median(peer_ms),
    }
    result["around_dispatch_ms"] = result["step_ms"] - result["dispatch_ms"]  # gate, combine, thread hop
    result["around_rpc_ms"] = result["dispatch_ms"] - result["rpc_ms"]  # grouping, planning, scatter
    result["wire_and_peer_service_ms"] = result["rpc_ms"] - result["peer_compute_ms"] - rtt_ms
    if bare_ms is not None:  # on loopback: the floor measured in this run, and what we add to it
        result["bare_grpc_round_trip_ms"] = bare_ms
        result["above_bare_grpc_ms"] = result["step_ms"] - bare_ms
    # CPU time per call of each process (all threads): what our work costs, less noisy than wall time
    result["coordinator_cpu_ms"], result["peer_cpu_ms"] = cpu
    result["profile"] = text
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coordinator.bench.decode_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rtt-ms", type=float, default=0.0, help="put the peer behind a delay link of this RTT")
    p.add_argument("--profile", type=int, default=0, help="print the N costliest functions of each thread")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.calls < 1 or args.rtt_ms < 0:
        p.error("--calls must be >= 1 and --rtt-ms >= 0")
    result = run(args.calls, args.rtt_ms, args.profile)
    profile = result.pop("profile")
    for key, value in result.items():
        print(f"{key:>26}: {value:.3f}" if isinstance(value, float) else f"{key:>26}: {value}")
    if profile:
        print(profile)


if __name__ == "__main__":
    main()
