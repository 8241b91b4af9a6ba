"""`moe-swarm demo`: a local swarm serving a toy MoE stack, tokens pushed through it, checked locally.

Starts a bootstrap DHT node and N peer processes on 127.0.0.1 that split the experts,
runs batches through the stack via the swarm and in-process, prints who served what,
latency, and the largest difference from the local computation; stops everything.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from protos import toy_model
from protos.toy_model import ToyConfig

from .client import SwarmClient
from .local_swarm import LocalSwarm
from .stats import percentile, time_calls
from .toy_stack import LocalExperts, ToyMoEStack

TOLERANCE = 1e-5


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peers", type=int, default=3, help="peer processes (each hosts a slice of every layer)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", default="1,16,64", help="comma-separated token counts to push through")
    p.add_argument("--repeats", type=int, default=10, help="timed stack calls per batch size")
    p.add_argument("--cache", type=Path, default=Path(".cache"), help="where the seeded checkpoint is kept")


def ensure_checkpoint(cache: Path, config: ToyConfig, seed: int) -> Path:
    """Build the seeded checkpoint once; reuse it while config and seed are unchanged."""
    path = cache / f"toy-L{config.num_layers}-E{config.num_experts}-H{config.hidden_dim}-F{config.ffn_dim}-s{seed}"
    try:
        toy_model.read_manifest(path)
    except (FileNotFoundError, ValueError):
        toy_model.save_checkpoint(path, config, seed)
    return path


def expert_slices(num_experts: int, peers: int) -> list[str]:
    """Split expert ids into `peers` contiguous ranges, every layer alike: '*:0-2', '*:3-5', ..."""
    bounds = [round(i * num_experts / peers) for i in range(peers + 1)]
    return [f"*:{lo}-{hi - 1}" for lo, hi in itertools.pairwise(bounds) if hi > lo]


def run_demo(args: argparse.Namespace) -> int:
    console = Console()
    config = ToyConfig(
        num_layers=args.layers, num_experts=args.num_experts, hidden_dim=args.hidden, ffn_dim=args.ffn, top_k=args.top_k
    )
    ckpt = ensure_checkpoint(args.cache, config, args.seed)
    manifest = toy_model.read_manifest(ckpt)
    console.print(
        f"[bold]model[/] {manifest.model_id}: {config.num_layers} MoE layers x {config.num_experts} "
        f"experts, hidden {config.hidden_dim}, top-{config.top_k}  ({ckpt})"
    )
    with LocalSwarm() as swarm:
        boot = swarm.start_bootstrap()
        console.print(f"bootstrap DHT node pid {boot.pid}: {swarm.initial_peers[0]}")
        peers = {}
        for i, spec in enumerate(expert_slices(config.num_experts, args.peers)):
            proc = swarm.start_peer(f"peer{i}", "--checkpoint", str(ckpt), "--experts", spec, "--threads", "1")
            peers[proc.info["peer_id"]] = (f"peer{i}", spec, proc)
            console.print(f"peer{i} pid {proc.pid} at {proc.info['endpoint']} hosts experts {spec}")
        local = ToyMoEStack.from_checkpoint(ckpt, LocalExperts.from_checkpoint(ckpt))
        with SwarmClient(swarm.initial_peers, manifest.uids()) as client:
            client.wait_for_experts()
            remote = ToyMoEStack.from_checkpoint(ckpt, client)
            gen = torch.Generator().manual_seed(args.seed + 1)
            rows = []
            worst = 0.0
            for tokens in (int(t) for t in args.batches.split(",")):
                x = torch.randn(tokens, config.hidden_dim, generator=gen)
                diff = (remote(x) - local(x)).abs().max().item()
                worst = max(worst, diff)
                times = time_calls(lambda x=x: remote(x), args.repeats, warmup=1)
                per_layer = [t / config.num_layers for t in times]
                rows.append((tokens, percentile(per_layer, 50), percentile(per_layer, 95), diff))
            stats = client.dispatcher.stats

    table = Table(title="who served what")
    for col in ("peer", "experts", "Forward RPCs", "token rows"):
        table.add_column(col)
    for peer_id, (name, spec, _) in peers.items():
        table.add_row(name, spec, str(stats.rpcs_by_peer[peer_id]), str(stats.rows_by_peer[peer_id]))
    console.print(table)
    lat = Table(title=f"layer call latency through the swarm ({args.repeats} stack calls each)")
    for col in ("tokens", "p50 ms / layer", "p95 ms / layer", "max |swarm - local|"):
        lat.add_column(col)
    for tokens, p50, p95, diff in rows:
        lat.add_row(str(tokens), f"{p50:.2f}", f"{p95:.2f}", f"{diff:.2e}")
    console.print(lat)
    console.print(
        f"{stats.layer_calls} layer calls, {stats.rpcs} RPCs "
        f"({stats.rpcs / max(stats.layer_calls, 1):.2f} per layer call, at most one per peer), "
        f"{stats.exact}/{stats.routed} token-expert pairs computed exactly"
    )
    ok = worst <= TOLERANCE
    verdict = "[green]equal to the local computation" if ok else "[red]DIFFERS from the local computation"
    console.print(f"{verdict}[/] (max abs diff {worst:.2e}, tolerance {TOLERANCE:g}); all processes stopped")
    return 0 if ok else 1
