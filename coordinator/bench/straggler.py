"""`moe-swarm bench straggler`: layer-call latency with one stalled peer, hedging on and off."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import torch

from coordinator.bench.harness import BenchSwarm, layer_input, remote_layer, report, toy_swarm
from coordinator.bench.timing import time_calls
from coordinator.dispatch.stats import percentile
from coordinator.sim.local_swarm import Process
from protos.toy_model import ToyConfig


def add_straggler_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--calls", type=int, default=60, help="timed layer calls per configuration")
    p.add_argument("--deadline", type=float, default=2.0, help="layer-call deadline in seconds")
    p.add_argument("--json", type=Path, default=None)


def run_straggler_bench(args: argparse.Namespace) -> dict:
    """Layer-call latency with 4 peers (every expert on 2 of them), with and without one
    stalled peer (SIGSTOP), hedging on and off, all in one run."""
    config = ToyConfig(num_layers=1, num_experts=8, hidden_dim=args.hidden, ffn_dim=2 * args.hidden, top_k=2)
    x = layer_input(args.tokens, args.hidden)
    results = {}
    with toy_swarm(config) as bench:
        peers = bench.start_peers(["*:0-3", "*:0-3", "*:4-7", "*:4-7"], "--threads", "1")
        for straggler in (False, True):
            for hedge in (True, False):
                name = f"{'straggler' if straggler else 'healthy'}_{'hedge' if hedge else 'nohedge'}"
                results[name] = _measure(bench, x, peers[0] if straggler else None, hedge, args)
    return report(results, args.json)


def _measure(
    bench: BenchSwarm, x: torch.Tensor, stalled: Process | None, hedge: bool, args: argparse.Namespace
) -> dict:
    """A fresh coordinator learns every peer's latency, then makes the timed calls while
    `stalled` (if any) is frozen."""
    with (
        bench.client(timeout=args.deadline, hedge=hedge, fallback="drop") as client,
        torch.inference_mode(),
    ):
        client.wait_for_experts()
        layer = remote_layer(bench.ckpt, client)
        time_calls(lambda: layer(x), 30, warmup=0)  # learn each peer's latency
        if stalled is not None:
            stalled.signal(signal.SIGSTOP)
        try:
            ms = time_calls(lambda: layer(x), args.calls, warmup=0)
        finally:
            if stalled is not None:
                stalled.signal(signal.SIGCONT)
        stats = client.dispatcher.stats
    return {
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "hedges": stats.hedges,
        "dropped": stats.dropped,
        "retries": stats.retries,
    }
