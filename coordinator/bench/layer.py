"""`moe-swarm bench layer`: one MoE layer call through the swarm, in-process, and via hivemind.

All three run in one invocation on the same machine, so ratios are comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from coordinator.bench.harness import (
    hivemind_matched_ffn,
    layer_input,
    local_layer,
    remote_layer,
    report,
    toy_swarm,
)
from coordinator.bench.hivemind_baseline import hivemind_layer
from coordinator.bench.timing import spread, summary, time_calls
from coordinator.client import SwarmClient
from protos.toy_model import ToyConfig


def add_layer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, default=8, help="experts in the layer")
    p.add_argument("--k", type=int, default=2, help="experts per token")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument(
        "--ffn",
        type=int,
        default=None,
        help="expert FFN size (default ~8/3 x hidden: a SwiGLU expert with the FLOPs of hivemind's ffn)",
    )
    p.add_argument("--tokens", type=int, default=64, help="tokens per layer call")
    p.add_argument("--repeats", type=int, default=200, help="timed calls of our layer (and of the in-process one)")
    p.add_argument("--hivemind-repeats", type=int, default=15, help="timed calls of hivemind's layer")
    p.add_argument(
        "--rounds", type=int, default=5, help="blocks per system, alternated, the timed calls spread over them"
    )
    p.add_argument(
        "--compare-hivemind",
        action="store_true",
        help="also run hivemind's RemoteMixtureOfExperts on the same number of ffn experts",
    )
    p.add_argument(
        "--relayed",
        action="store_true",
        help="instead: a direct peer vs one served through a circuit relay (libp2p), side by side",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")


@dataclass
class _Timed:
    """Milliseconds per call of each system, and what the swarm's calls cost on our side."""

    ours: list[float] = field(default_factory=list)
    in_process: list[float] = field(default_factory=list)
    hivemind: list[float] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)  # per round: hivemind's median / ours
    io_cpu_s: float = 0.0  # CPU time of the coordinator's I/O thread over all of our calls
    peer_compute_ms: float = 0.0


async def _thread_cpu_s() -> float:
    return time.thread_time()


def run_layer_bench(args: argparse.Namespace) -> dict:
    """Ours, in-process and (optionally) hivemind's layer, called in alternating blocks.

    This VM's speed moves within minutes; blocks of each system in turn put every phase into
    all of them, so the medians and the speedup compare like with like.
    """
    if args.rounds < 1 or args.repeats < 1 or args.hivemind_repeats < 1:
        raise SystemExit("bench layer: --rounds, --repeats and --hivemind-repeats must be >= 1")
    if args.relayed:
        from coordinator.bench.relayed import run_relayed_layer_bench

        return run_relayed_layer_bench(args)
    ffn = args.ffn or hivemind_matched_ffn(args.hidden)
    config = ToyConfig(num_layers=1, num_experts=args.experts, hidden_dim=args.hidden, ffn_dim=ffn, top_k=args.k)
    x = layer_input(args.tokens, args.hidden)
    with toy_swarm(config) as bench, contextlib.ExitStack() as stack:
        # the peer gets torch's default threads, like hivemind's server: it is the only process
        # computing while the client waits; the client itself runs one thread (see cli.py)
        bench.start_peer()
        # hivemind's client first: its DHT forks before this process has used gRPC
        theirs = None
        if args.compare_hivemind:
            theirs = stack.enter_context(hivemind_layer(bench.swarm, args.experts, args.hidden, args.k))
        local = local_layer(bench.ckpt)
        client = stack.enter_context(bench.client())
        remote = remote_layer(bench.ckpt, client)
        client.wait_for_experts()
        stack.enter_context(torch.inference_mode())
        diff = (remote(x) - local(x)).abs().max().item()
        time_calls(lambda: remote(x), 0)  # warm-up, outside the CPU window
        if theirs is not None:
            out = theirs(x)
            assert out.shape == x.shape, f"hivemind returned {tuple(out.shape)}"
            time_calls(lambda: theirs(x), 0, warmup=1)
        timed = _alternate(args, client, remote, local, theirs, x)
    return report(_result(args, ffn, diff, timed), args.json)


def _alternate(
    args: argparse.Namespace,
    client: SwarmClient,
    remote: nn.Module,
    local: nn.Module,
    theirs: nn.Module | None,
    x: torch.Tensor,
) -> _Timed:
    """The timed calls: per round, a block of ours, one in-process, one of hivemind's."""
    timed = _Timed()
    client.dispatcher.stats.clear_samples()
    blocks = zip(spread(args.repeats, args.rounds), spread(args.hivemind_repeats, args.rounds), strict=True)
    for ours_n, theirs_n in blocks:
        cpu = client.io.run(_thread_cpu_s())
        block = time_calls(lambda: remote(x), ours_n, warmup=0)
        timed.io_cpu_s += client.io.run(_thread_cpu_s()) - cpu
        timed.ours += block
        timed.in_process += time_calls(lambda: local(x), ours_n, warmup=1)
        if theirs is not None:
            their_block = time_calls(lambda: theirs(x), theirs_n, warmup=0)
            timed.hivemind += their_block
            timed.speedups.append(statistics.median(their_block) / statistics.median(block))
    timed.peer_compute_ms = statistics.median(client.dispatcher.stats.peer_compute_ms)
    return timed


def _result(args: argparse.Namespace, ffn: int, diff: float, timed: _Timed) -> dict:
    ours, in_process = summary(timed.ours), summary(timed.in_process)
    result = {
        "tokens": args.tokens,
        "experts": args.experts,
        "k": args.k,
        "hidden": args.hidden,
        "ffn": ffn,
        "rounds": args.rounds,
        "moe_swarm_ms": ours["median_ms"],
        "moe_swarm_p99_ms": ours["p99_ms"],
        "in_process_ms": in_process["median_ms"],
        "overhead_vs_in_process": ours["median_ms"] / in_process["median_ms"],
        # where a call's time goes: the expert math the peer reports, and the CPU the
        # coordinator's I/O thread spends per call (grouping, sealing, gRPC, checking answers)
        "peer_compute_ms": timed.peer_compute_ms,
        "coordinator_io_cpu_ms": timed.io_cpu_s * 1e3 / len(timed.ours),
        "max_abs_diff_vs_local": diff,
    }
    if timed.hivemind:
        theirs = summary(timed.hivemind)
        result.update(
            hivemind_ms=theirs["median_ms"],
            hivemind_p99_ms=theirs["p99_ms"],
            speedup=theirs["median_ms"] / ours["median_ms"],
            # the ratio of each round's medians: how far the VM's phases move the speedup
            speedup_per_round=timed.speedups,
        )
    return result
