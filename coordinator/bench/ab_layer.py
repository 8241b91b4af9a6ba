"""A/B of the layer call between two source trees, interleaved so the machine's drift hits both.

    git worktree add /tmp/base <commit>
    python -m coordinator.bench.ab_layer /tmp/base . --blocks 12 --calls 100
    python -m coordinator.bench.ab_layer . . --env-b OMP_WAIT_POLICY=PASSIVE   # a setting, same code

Each tree gets a worker process (its own bootstrap, one peer hosting all experts, a
coordinator: the `bench layer` workload) that stays up; blocks of calls then alternate
between the two (ABBA order), and each block reports its median and the CPU both processes
spent per call. On a machine whose speed drifts within minutes, back-to-back runs of `bench
layer` cannot show a 5% change; paired blocks can. Each worker runs its own tree's copy of
this module, so both trees need it (coordinator/bench/ab_layer.py and harness.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from coordinator.bench.harness import hivemind_matched_ffn, layer_input, remote_layer, toy_swarm
from coordinator.sim.local_swarm import Process
from protos.toy_model import ToyConfig

TICKS = os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    """User + system CPU of every thread of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


@contextlib.contextmanager
def one_peer_layer(experts: int, k: int, hidden: int, tokens: int) -> Iterator[tuple[Process, nn.Module, torch.Tensor]]:
    """The `bench layer` workload, warmed up: (the peer process, the remote layer, its input).
    Runs on whatever tree this process imports (PYTHONPATH)."""
    torch.set_num_threads(1)  # as `moe-swarm bench layer`'s client
    ffn = hivemind_matched_ffn(hidden)
    config = ToyConfig(num_layers=1, num_experts=experts, hidden_dim=hidden, ffn_dim=ffn, top_k=k)
    x = layer_input(tokens, hidden)
    with toy_swarm(config) as bench:
        peer = bench.start_peer()
        with bench.client() as client, torch.inference_mode():
            layer = remote_layer(bench.ckpt, client)
            client.wait_for_experts()
            for _ in range(30):
                layer(x)
            yield peer, layer, x


def worker(experts: int, k: int, hidden: int, tokens: int) -> None:
    """Serve blocks of layer calls: reads a call count per line, answers 'median_ms cpu_ms_per_call'."""
    with one_peer_layer(experts, k, hidden, tokens) as (peer, layer, x):
        print("ready", flush=True)
        for line in sys.stdin:
            calls = int(line)
            cpu = _process_cpu_s(peer.pid) + _process_cpu_s(os.getpid())
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                layer(x)
                times.append(time.perf_counter() - start)
            cpu = _process_cpu_s(peer.pid) + _process_cpu_s(os.getpid()) - cpu
            print(f"{statistics.median(times) * 1e3:.3f} {cpu * 1e3 / calls:.3f}", flush=True)


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m coordinator.bench.ab_layer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("a", type=Path, help="source tree A (the baseline)")
    p.add_argument("b", type=Path, help="source tree B")
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--calls", type=int, default=100, help="layer calls per block")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument(
        "--env-b",
        action="append",
        default=[],
        type=_setting,
        metavar="NAME=VALUE",
        help="environment for B's processes only (B may then be the same tree: an A/B of a setting)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _start_workers(args: argparse.Namespace) -> dict[str, subprocess.Popen]:
    shape = ["--experts", str(args.experts), "--k", str(args.k), "--hidden", str(args.hidden)]
    command = [sys.executable, "-m", "coordinator.bench.ab_layer", "-", "-", "--worker", *shape]
    workers = {}
    for name, tree in (("A", args.a), ("B", args.b)):
        env = {**os.environ, "PYTHONPATH": str(tree.resolve())}  # ahead of the installed package
        if name == "B":
            env.update(args.env_b)
        workers[name] = subprocess.Popen(
            [*command, "--tokens", str(args.tokens)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),  # not a tree: the working directory comes first on sys.path
        )
    return workers


def _run_blocks(args: argparse.Namespace, workers: dict[str, subprocess.Popen]) -> None:
    for name, w in workers.items():
        if w.stdout.readline().strip() != "ready":
            raise SystemExit(f"worker {name} did not start (tree {args.a if name == 'A' else args.b})")
    medians: dict[str, list[float]] = {"A": [], "B": []}
    cpu: dict[str, list[float]] = {"A": [], "B": []}
    for block in range(args.blocks):
        for name in "AB" if block % 2 == 0 else "BA":
            workers[name].stdin.write(f"{args.calls}\n")
            workers[name].stdin.flush()
            median, per_call = map(float, workers[name].stdout.readline().split())
            medians[name].append(median)
            cpu[name].append(per_call)
        print(
            f"block {block}: A {medians['A'][-1]:.2f} ms  B {medians['B'][-1]:.2f} ms  "
            f"B/A {medians['B'][-1] / medians['A'][-1]:.3f}",
            flush=True,
        )
    ratios = [b / a for a, b in zip(medians["A"], medians["B"], strict=True)]
    print(
        f"median A {statistics.median(medians['A']):.2f} ms, B {statistics.median(medians['B']):.2f} ms; "
        f"B/A median {statistics.median(ratios):.3f}, B faster in {sum(r < 1 for r in ratios)} of {len(ratios)} "
        f"blocks; CPU per call (peer + coordinator) A {statistics.median(cpu['A']):.2f} ms, "
        f"B {statistics.median(cpu['B']):.2f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(args.experts, args.k, args.hidden, args.tokens)
        return
    workers = _start_workers(args)
    try:
        _run_blocks(args, workers)
    finally:
        for w in workers.values():
            w.stdin.close()
            w.wait(timeout=60)


if __name__ == "__main__":
    main()
