"""`moe-swarm bench saturation`: rows/s one peer serves with many layer calls in flight,
against its experts' raw rows/s computed back to back in a process of their own."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from coordinator.bench.harness import BenchSwarm, hivemind_matched_ffn, layer_input, local_layer, report, toy_swarm
from coordinator.client import SwarmClient
from coordinator.models.gating import topk_softmax
from protos.toy_model import ToyConfig


def add_saturation_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=64, help="tokens per layer call (x top-2 rows)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=None, help="expert FFN size (default 8/3 x hidden)")
    p.add_argument("--concurrency", type=int, default=16, help="layer calls in flight at once")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--max-batch-rows", type=int, default=4096, help="the peer's --max-batch-rows")
    p.add_argument(
        "--pin",
        choices=["device", "core", "off"],
        default="device" if len(os.sched_getaffinity(0)) >= 2 else "off",
        help="device: the peer's expert math alone on CPU 0 (--compute-cpus 0, one thread), as a GPU would be, "
        "its network/crypto and the load-generating client on the other CPUs; core: the whole peer on CPU 0, "
        "the client elsewhere (the peer pays its per-request work out of its compute); off: no pinning. "
        "The raw baseline runs on CPU 0 with one thread when pinned (default: device with 2+ CPUs)",
    )
    p.add_argument("--json", type=Path, default=None)


def _cpu_seconds(pid: int, children: bool = True) -> float:
    import psutil

    procs = [psutil.Process(pid), *(psutil.Process(pid).children(recursive=True) if children else [])]
    return sum(t.user + t.system for p in procs for t in [p.cpu_times()])


def _pin(pid: int, cpus: set[int], children: bool = True) -> None:
    """Every thread of `pid` (and of its descendants: DHT process, p2pd) onto `cpus`."""
    import psutil

    for proc in [psutil.Process(pid), *(psutil.Process(pid).children(recursive=True) if children else [])]:
        for thread in proc.threads():
            os.sched_setaffinity(thread.id, cpus)


def run_saturation_bench(args: argparse.Namespace) -> dict:
    """Rows/s one peer serves with many layer calls in flight vs its experts' raw rows/s in-process."""
    ffn = args.ffn or hivemind_matched_ffn(args.hidden)
    config = ToyConfig(num_layers=1, num_experts=8, hidden_dim=args.hidden, ffn_dim=ffn, top_k=2)
    x = layer_input(args.tokens, args.hidden)
    pinned = args.pin != "off"
    raw_cpus = {0} if pinned else None
    raw_rows = args.tokens * 2 * args.concurrency
    with toy_swarm(config, bootstrap=False) as bench:
        # the routing of every call: the same layer's gate, in this process
        local = local_layer(bench.ckpt)
        with torch.inference_mode():
            _, experts = topk_softmax(local.gate(x), 2)
        raw_before = _raw_rows_per_s(bench.ckpt, raw_rows, args.hidden, raw_cpus)  # swarm not up yet
        bench.swarm.start_bootstrap()
        peer = bench.start_peer(
            "--max-batch-rows",
            str(args.max_batch_rows),
            *(["--threads", "1"] * pinned),
            *(["--compute-cpus", "0"] * (args.pin == "device")),
        )
        if args.pin == "core":
            _pin(peer.pid, {0})
        if pinned:
            _pin(os.getpid(), os.sched_getaffinity(0) - {0}, children=False)  # the swarm is our child
        served, busy, client_busy = _serve(bench, peer.pid, x, experts, local.uids, args)
        bench.swarm.stop(peer)  # raw again on the same CPU, the peer gone
        # this machine's speed drifts within a minute: raw is the mean of a run before and after
        raw_after = _raw_rows_per_s(bench.ckpt, raw_rows, args.hidden, raw_cpus)
    raw = (raw_before + raw_after) / 2
    result = {
        "pin": args.pin,
        # CPU-seconds per second: near 1.0 (one pinned core) means the peer was the bottleneck
        "peer_cpu_busy": busy,
        "client_cpu_busy": client_busy,
        "hidden": args.hidden,
        "ffn": ffn,
        "rows_per_call": experts.numel(),
        "concurrency": args.concurrency,
        "served_rows_per_s": served,
        "raw_rows_per_s": raw,
        "raw_rows_per_s_before_after": [raw_before, raw_after],
        "served_over_raw": served / raw,
    }
    return report(result, args.json)


def _serve(
    bench: BenchSwarm, peer_pid: int, x: torch.Tensor, experts: torch.Tensor, uids: list[str], args: argparse.Namespace
) -> tuple[float, float, float]:
    """Rows/s served with `args.concurrency` calls in flight for `args.seconds` (after as long a
    warm-up), and the CPU-seconds per second the peer and this process spent meanwhile."""
    with bench.client(hedge=False) as client:
        client.wait_for_experts()
        with torch.inference_mode():
            client.io.run(_saturate(client, x, experts, uids, args.concurrency, args.seconds))  # warm-up
            peer_cpu, mine = _cpu_seconds(peer_pid), _cpu_seconds(os.getpid(), children=False)
            started = time.perf_counter()
            served = client.io.run(_saturate(client, x, experts, uids, args.concurrency, args.seconds))
            wall = time.perf_counter() - started
            busy = (_cpu_seconds(peer_pid) - peer_cpu) / wall
            client_busy = (_cpu_seconds(os.getpid(), children=False) - mine) / wall
    return served, busy, client_busy


async def _saturate(
    client: SwarmClient, x: torch.Tensor, experts: torch.Tensor, uids: list[str], concurrency: int, seconds: float
) -> float:
    """Rows/s served while `concurrency` workers each keep one layer call in flight."""
    dispatcher = client.dispatcher

    async def worker(stop_at: float) -> int:
        rows = 0
        while time.perf_counter() < stop_at:
            await dispatcher.dispatch(x, experts, uids, x.dtype)
            rows += experts.numel()
        return rows

    stop_at = time.perf_counter() + seconds
    start = time.perf_counter()
    rows = sum(await asyncio.gather(*(worker(stop_at) for _ in range(concurrency))))
    return rows / (time.perf_counter() - start)


def _raw_rows_per_s(ckpt: Path, rows: int, hidden: int, cpus: set[int] | None = None) -> float:
    """The experts' own throughput: a subprocess with the peer's threads (one on `cpus` when pinned)."""
    code = (
        (f"import os;os.sched_setaffinity(0,{cpus!r});import torch;torch.set_num_threads(1);" if cpus else "")
        + "import torch,time;from peer.backends.toy import HostedExperts;"
        f"h=HostedExperts.from_checkpoint({str(ckpt)!r},'*',torch.device('cpu'));"
        f"x=torch.randn({rows},{hidden});n=len(h.uids);s=[(u,{rows}//n) for u in h.uids];"
        f"x=x[:sum(r for _,r in s)];h.forward(x,s);t=time.perf_counter();[h.forward(x,s) for _ in range(10)];"
        "print(x.shape[0]*10/(time.perf_counter()-t))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])
