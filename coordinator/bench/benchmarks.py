"""`moe-swarm bench layer`: one MoE layer call through the swarm, in-process, and via hivemind.

All three run in one invocation on the same machine, so ratios are comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from coordinator.bench.timing import summary, time_calls
from coordinator.client import SwarmClient
from coordinator.models.gating import topk_softmax
from coordinator.models.toy_stack import LocalExperts, ToyMoEStack
from coordinator.sim.local_swarm import LocalSwarm
from protos import tensors, toy_model
from protos.expert_spec import expert_slices
from protos.plumbing.dht import fork_safe_gc
from protos.toy_model import ToyConfig


def hivemind_matched_ffn(hidden: int) -> int:
    """The SwiGLU FFN size with the FLOPs of hivemind's ffn expert: that one is H->4H->H (8H^2
    MACs), SwiGLU has three H x F matrices, so F = 8H/3 (a multiple of 8)."""
    return max(8, round(8 * hidden / 3 / 8) * 8)


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
    p.add_argument("--json", type=Path, default=None, help="write the results here")


def add_generate_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default="mixtral", help="tiny model family (coordinator/models/tiny.py)")
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny model")
    p.add_argument("--ffn", type=int, default=512, help="expert FFN size")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="write the results here")


def run_generate_bench(args: argparse.Namespace) -> dict:
    """Greedy generation tokens/s through a local swarm vs the same model run locally, same run."""
    from transformers import AutoModelForCausalLM

    from coordinator.commands.generate import greedy
    from coordinator.models.hf import checkpoint_info, load_swarm_model
    from coordinator.models.tiny import VOCAB, save_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp, LocalSwarm(Path(tmp) / "swarm") as swarm:
        ckpt = save_tiny_checkpoint(
            Path(tmp) / "ckpt",
            args.family,
            seed=0,
            hidden_size=args.hidden,
            intermediate_size=args.ffn,
            num_hidden_layers=args.layers,
        )
        info = checkpoint_info(ckpt)
        swarm.start_bootstrap()
        swarm.start_peers(
            {
                f"peer{i}": ["--model", str(ckpt), "--experts", spec, "--threads", "1"]
                for i, spec in enumerate(expert_slices(info.checkpoint.num_experts, args.peers))
            }
        )
        ids = torch.randint(0, VOCAB, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        local = AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="eager").eval()
        with SwarmClient(swarm.initial_peers, info.uids, refresh_period=60) as client:
            client.wait_for_experts()
            remote = load_swarm_model(ckpt, client, info=info)
            greedy(remote, ids, 4)  # warm-up: channels, allocator
            greedy(local, ids, 4)
            ours = greedy(remote, ids, args.max_new_tokens)
            theirs = greedy(local, ids, args.max_new_tokens)
            stats = client.dispatcher.stats
        layer_ms = [ms for calls in stats.layer_ms.values() for ms in calls]
        result = {
            "family": args.family,
            "hidden": args.hidden,
            "layers": args.layers,
            "peers": args.peers,
            "new_tokens": ours.new_tokens,
            "swarm_tokens_per_s": ours.new_tokens / ours.seconds,
            "local_tokens_per_s": theirs.new_tokens / theirs.seconds,
            "swarm_over_local": (ours.new_tokens / ours.seconds) / (theirs.new_tokens / theirs.seconds),
            "layer_call_p50_ms": statistics.median(layer_ms),
            "same_tokens": bool(torch.equal(ours.output_ids, theirs.output_ids)),
        }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def add_straggler_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--calls", type=int, default=60, help="timed layer calls per configuration")
    p.add_argument("--deadline", type=float, default=2.0, help="layer-call deadline in seconds")
    p.add_argument("--json", type=Path, default=None)


def run_straggler_bench(args: argparse.Namespace) -> dict:
    """Layer-call latency with 4 peers (every expert on 2 of them), with and without one
    stalled peer (SIGSTOP), hedging on and off, all in one run."""
    import signal as signals

    from coordinator.dispatch.stats import percentile

    config = ToyConfig(num_layers=1, num_experts=8, hidden_dim=args.hidden, ffn_dim=2 * args.hidden, top_k=2)
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(1))
    results = {}
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp, LocalSwarm(Path(tmp) / "swarm") as swarm:
        ckpt = Path(tmp) / "ckpt"
        toy_model.save_checkpoint(ckpt, config, seed=0)
        swarm.start_bootstrap()
        peers = swarm.start_peers(
            {
                f"peer{i}": ["--checkpoint", str(ckpt), "--experts", spec, "--threads", "1"]
                for i, spec in enumerate(["*:0-3", "*:0-3", "*:4-7", "*:4-7"])
            }
        )
        uids = toy_model.read_manifest(ckpt).uids()
        for straggler in (False, True):
            for hedge in (True, False):
                with (
                    SwarmClient(
                        swarm.initial_peers,
                        uids,
                        refresh_period=60,
                        timeout=args.deadline,
                        hedge=hedge,
                        fallback="drop",
                    ) as client,
                    torch.inference_mode(),
                ):
                    client.wait_for_experts()
                    layer = ToyMoEStack.from_checkpoint(ckpt, client).layers[0]
                    time_calls(lambda layer=layer: layer(x), 30, warmup=0)  # learn each peer's latency
                    if straggler:
                        peers[0].signal(signals.SIGSTOP)
                    try:
                        ms = time_calls(lambda layer=layer: layer(x), args.calls, warmup=0)
                    finally:
                        peers[0].signal(signals.SIGCONT)
                    stats = client.dispatcher.stats
                name = f"{'straggler' if straggler else 'healthy'}_{'hedge' if hedge else 'nohedge'}"
                results[name] = {
                    "p50_ms": percentile(ms, 50),
                    "p99_ms": percentile(ms, 99),
                    "hedges": stats.hedges,
                    "dropped": stats.dropped,
                    "retries": stats.retries,
                }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


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
    import asyncio

    from coordinator.models.toy_stack import LocalExperts

    ffn = args.ffn or hivemind_matched_ffn(args.hidden)
    config = ToyConfig(num_layers=1, num_experts=8, hidden_dim=args.hidden, ffn_dim=ffn, top_k=2)
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp, LocalSwarm(Path(tmp) / "swarm") as swarm:
        ckpt = Path(tmp) / "ckpt"
        toy_model.save_checkpoint(ckpt, config, seed=0)
        # raw: the same expert math in this process, one big batch (all experts' rows at once)
        local = ToyMoEStack.from_checkpoint(ckpt, LocalExperts.from_checkpoint(ckpt)).layers[0]
        with torch.inference_mode():
            _, experts = topk_softmax(local.gate(x), 2)
        pinned = args.pin != "off"
        raw_cpus = {0} if pinned else None
        raw_rows = args.tokens * 2 * args.concurrency
        raw_before = _raw_rows_per_s(ckpt, raw_rows, args.hidden, raw_cpus)  # swarm not up yet
        swarm.start_bootstrap()
        peer = swarm.start_peer(
            "peer0",
            "--checkpoint",
            str(ckpt),
            "--experts",
            "*",
            "--max-batch-rows",
            str(args.max_batch_rows),
            *(["--threads", "1"] * pinned),
            *(["--compute-cpus", "0"] * (args.pin == "device")),
        )
        others = sorted(os.sched_getaffinity(0) - {0})
        if args.pin == "core":
            _pin(peer.pid, {0})
        if pinned:
            _pin(os.getpid(), set(others), children=False)  # the swarm is our child
        with SwarmClient(
            swarm.initial_peers, toy_model.read_manifest(ckpt).uids(), refresh_period=60, hedge=False
        ) as client:
            client.wait_for_experts()
            dispatcher, uids = client.dispatcher, local.uids

            async def worker(stop_at: float) -> int:
                rows = 0
                while time.perf_counter() < stop_at:
                    await dispatcher.dispatch(x, experts, uids, x.dtype)
                    rows += experts.numel()
                return rows

            async def saturate() -> float:
                stop_at = time.perf_counter() + args.seconds
                start = time.perf_counter()
                rows = sum(await asyncio.gather(*(worker(stop_at) for _ in range(args.concurrency))))
                return rows / (time.perf_counter() - start)

            with torch.inference_mode():
                client.io.run(saturate())  # warm-up
                peer_cpu, mine = _cpu_seconds(peer.pid), _cpu_seconds(os.getpid(), children=False)
                started = time.perf_counter()
                served = client.io.run(saturate())
                wall = time.perf_counter() - started
                busy = (_cpu_seconds(peer.pid) - peer_cpu) / wall
                client_busy = (_cpu_seconds(os.getpid(), children=False) - mine) / wall
        swarm.stop(peer)  # raw again on the same CPU, the peer gone
        # this machine's speed drifts by +-20% over a minute: raw is the mean of a run before and after
        raw_after = _raw_rows_per_s(ckpt, raw_rows, args.hidden, raw_cpus)
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
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _raw_rows_per_s(ckpt: Path, rows: int, hidden: int, cpus: set[int] | None = None) -> float:
    """The experts' own throughput: a subprocess with the peer's threads (one on `cpus` when pinned)."""
    import subprocess
    import sys

    code = (
        (f"import os;os.sched_setaffinity(0,{cpus!r});import torch;torch.set_num_threads(1);" if cpus else "")
        + "import torch,time;from peer.experts import HostedExperts;"
        f"h=HostedExperts.from_checkpoint({str(ckpt)!r},'*',torch.device('cpu'));"
        f"x=torch.randn({rows},{hidden});n=len(h.uids);s=[(u,{rows}//n) for u in h.uids];"
        f"x=x[:sum(r for _,r in s)];h.forward(x,s);t=time.perf_counter();[h.forward(x,s) for _ in range(10)];"
        "print(x.shape[0]*10/(time.perf_counter()-t))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _hivemind_layer(swarm: LocalSwarm, args: argparse.Namespace) -> Iterator[nn.Module]:
    """hivemind's RemoteMixtureOfExperts over a hivemind Server with the same number of ffn
    experts (another process on this swarm's bootstrap), ready to call."""
    from hivemind import DHT
    from hivemind.moe.client.moe import RemoteMixtureOfExperts
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    swarm._spawn(
        "hivemind-server",
        [
            "-m",
            "coordinator.bench.hivemind_baseline",
            "--experts",
            str(args.experts),
            "--hidden",
            str(args.hidden),
            "--initial-peers",
            *swarm.initial_peers,
        ],
    )
    with fork_safe_gc():  # in case this process has used gRPC already (protos/plumbing/dht.py)
        dht = DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        yield RemoteMixtureOfExperts(
            in_features=args.hidden,
            grid_size=(args.experts,),
            dht=dht,
            uid_prefix="expert.",
            k_best=args.k,
            forward_timeout=30,
        )
    finally:
        # hivemind's client keeps a P2P replica on its worker loop; close it there, or its
        # destructor fails noisily at interpreter exit
        if dht._p2p_replica is not None:
            RemoteExpertWorker.run_coroutine(dht._p2p_replica.shutdown())
        dht.shutdown()


async def _thread_cpu_s() -> float:
    return time.thread_time()


def _rounds(total: int, rounds: int) -> list[int]:
    """`total` calls spread over `rounds` blocks as evenly as possible (every block >= 1)."""
    return [max(1, total // rounds + (i < total % rounds)) for i in range(rounds)]


def run_layer_bench(args: argparse.Namespace) -> dict:
    """Ours, in-process and (optionally) hivemind's layer, called in alternating blocks.

    This VM's speed moves up to 2x within minutes; blocks of each system in turn put every
    phase into all of them, so the medians and the speedup compare like with like.
    """
    if args.rounds < 1 or args.repeats < 1 or args.hivemind_repeats < 1:
        raise SystemExit("bench layer: --rounds, --repeats and --hivemind-repeats must be >= 1")
    ffn = args.ffn or hivemind_matched_ffn(args.hidden)
    config = ToyConfig(num_layers=1, num_experts=args.experts, hidden_dim=args.hidden, ffn_dim=ffn, top_k=args.k)
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(1))
    with (
        tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp,
        LocalSwarm(Path(tmp) / "swarm") as swarm,
        contextlib.ExitStack() as stack,
    ):
        ckpt = Path(tmp) / "ckpt"
        toy_model.save_checkpoint(ckpt, config, seed=0)
        swarm.start_bootstrap()
        # the peer gets torch's default threads, like hivemind's server: it is the only process
        # computing while the client waits; the client itself runs one thread (see cli.py)
        swarm.start_peer("peer0", "--checkpoint", str(ckpt), "--experts", "*")
        # hivemind's client first: its DHT forks before this process has used gRPC
        theirs = stack.enter_context(_hivemind_layer(swarm, args)) if args.compare_hivemind else None
        local = ToyMoEStack.from_checkpoint(ckpt, LocalExperts.from_checkpoint(ckpt)).layers[0]
        # a slow refresh keeps DHT traffic out of the timed calls
        client = stack.enter_context(
            SwarmClient(swarm.initial_peers, toy_model.read_manifest(ckpt).uids(), refresh_period=60)
        )
        remote = ToyMoEStack.from_checkpoint(ckpt, client).layers[0]
        client.wait_for_experts()
        stack.enter_context(torch.inference_mode())
        diff = (remote(x) - local(x)).abs().max().item()
        time_calls(lambda: remote(x), 0)  # warm-up, outside the CPU window
        if theirs is not None:
            out = theirs(x)
            assert out.shape == x.shape, f"hivemind returned {tuple(out.shape)}"
            time_calls(lambda: theirs(x), 0, warmup=1)
        ours, in_process, hivemind, speedups = [], [], [], []
        io_cpu = 0.0
        reported = len(client.dispatcher.stats.peer_compute_ms)
        for ours_n, theirs_n in zip(
            _rounds(args.repeats, args.rounds), _rounds(args.hivemind_repeats, args.rounds), strict=True
        ):
            cpu = client.io.run(_thread_cpu_s())
            block = time_calls(lambda: remote(x), ours_n, warmup=0)
            io_cpu += client.io.run(_thread_cpu_s()) - cpu
            ours += block
            in_process += time_calls(lambda: local(x), ours_n, warmup=1)
            if theirs is not None:
                hivemind += (their_block := time_calls(lambda: theirs(x), theirs_n, warmup=0))
                speedups.append(statistics.median(their_block) / statistics.median(block))
        peer_compute = statistics.median(client.dispatcher.stats.peer_compute_ms[reported:])
    ours_s, in_process_s = summary(ours), summary(in_process)
    result = {
        "tokens": args.tokens,
        "experts": args.experts,
        "k": args.k,
        "hidden": args.hidden,
        "ffn": ffn,
        "rounds": args.rounds,
        "moe_swarm_ms": ours_s["median_ms"],
        "moe_swarm_p99_ms": ours_s["p99_ms"],
        "in_process_ms": in_process_s["median_ms"],
        "overhead_vs_in_process": ours_s["median_ms"] / in_process_s["median_ms"],
        # where a call's time goes: the expert math the peer reports, and the CPU the
        # coordinator's I/O thread spends per call (grouping, sealing, gRPC, checking answers)
        "peer_compute_ms": peer_compute,
        "coordinator_io_cpu_ms": io_cpu * 1e3 / len(ours),
        "max_abs_diff_vs_local": diff,
    }
    if hivemind:
        theirs_s = summary(hivemind)
        result.update(
            hivemind_ms=theirs_s["median_ms"],
            hivemind_p99_ms=theirs_s["p99_ms"],
            speedup=theirs_s["median_ms"] / ours_s["median_ms"],
            # the ratio of each round's medians: how far the VM's phases move the speedup
            speedup_per_round=speedups,
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def add_security_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=1408, help="expert FFN size (fine-grained experts, as Qwen-MoE/OLMoE)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 1], help="tokens per layer call (k=2)")
    p.add_argument("--repeats", type=int, default=40, help="timed calls per configuration")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", type=Path, default=None)


def run_security_bench(args: argparse.Namespace) -> dict:
    """One layer call (bf16 by default), sealed + signed vs plaintext, against the same peer in one run
    (calls alternate between the two clients so drift hits both alike)."""
    config = ToyConfig(
        num_layers=1, num_experts=args.experts, hidden_dim=args.hidden, ffn_dim=args.ffn, top_k=2, dtype=args.dtype
    )
    dtype = tensors.dtype_from_name(args.dtype)
    results: dict = {"hidden": args.hidden, "ffn": args.ffn, "dtype": args.dtype}
    # big experts load and self-benchmark slowly on a small CPU machine
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp, LocalSwarm(Path(tmp) / "swarm", 600) as swarm:
        ckpt = Path(tmp) / "ckpt"
        toy_model.save_checkpoint(ckpt, config, seed=0)
        uids = toy_model.read_manifest(ckpt).uids()
        swarm.start_bootstrap()
        swarm.start_peer("peer0", "--checkpoint", str(ckpt), "--experts", "*", "--allow-plaintext")
        with (
            SwarmClient(swarm.initial_peers, uids, refresh_period=60, hedge=False) as sealed,
            SwarmClient(swarm.initial_peers, uids, refresh_period=60, hedge=False, secure=False) as plain,
        ):
            sealed.wait_for_experts()
            plain.wait_for_experts()
            for tokens in args.tokens:
                gen = torch.Generator().manual_seed(tokens)
                x = torch.randn(tokens, args.hidden, generator=gen).to(dtype)
                experts = torch.stack([torch.randperm(args.experts, generator=gen)[:2] for _ in range(tokens)])
                times: dict[str, list[float]] = {"sealed": [], "plaintext": []}
                for i in range(args.repeats + 3):
                    for name, client in (("sealed", sealed), ("plaintext", plain)):
                        start = time.perf_counter()
                        client.dispatch(x, experts, uids, dtype)
                        if i >= 3:  # warm-up: channels, sessions, allocator
                            times[name].append((time.perf_counter() - start) * 1e3)
                s, p = summary(times["sealed"]), summary(times["plaintext"])
                results[f"{tokens}_tokens"] = {
                    "crypto_ms_in_process": _crypto_ms(x, experts, uids),
                    "sealed": s,
                    "plaintext": p,
                    "overhead_ms": s["median_ms"] - p["median_ms"],
                    "overhead_pct": 100 * (s["median_ms"] / p["median_ms"] - 1),
                }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def _crypto_ms(x: torch.Tensor, experts: torch.Tensor, uids: list[str], repeats: int = 20) -> float:
    """Both sides' security work for one request carrying all of a layer call's rows, without
    the network or compute: seal, open, digests, receipt signature and its check (median ms)."""
    from protos import envelope, sealed

    peer, client = envelope.Identity.generate(), envelope.Identity.generate()
    hello, keys = envelope.client_hello(client, peer.kx_public)
    peer_keys = envelope.accept_hello(peer, hello)
    rows = x[torch.arange(x.shape[0]).repeat_interleave(experts.shape[1])]
    segments = [(uids[0], rows.shape[0])]

    def round_trip() -> None:
        sent = sealed.build_request(segments, rows, 10.0, keys, 1)
        req = sent.request
        plain = envelope.open_sealed(peer_keys.to_peer, req.counter, req.inputs.data, sent.header)
        out_header = envelope.response_header(sent.header, req.inputs.dtype, req.inputs.shape)
        statement = envelope.receipt_statement(
            envelope.digest(sent.header, plain), envelope.digest(out_header, plain), [uids[0]], "m"
        )
        signature = peer.sign(statement)
        out = envelope.seal(peer_keys.to_client, req.counter, plain, out_header)
        back = envelope.open_sealed(keys.to_client, req.counter, out, out_header)
        envelope.digest(sent.header, sent.plaintext), envelope.digest(out_header, back)
        assert envelope.verify(peer.public, signature, statement)

    return statistics.median(time_calls(round_trip, repeats, warmup=2))
