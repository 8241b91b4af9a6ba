"""`moe-swarm bench security`: one layer call sealed + signed vs plaintext, against the same peer;
and the cost of the default spot-check rate (layer calls with it vs without, two replicas)."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from coordinator.bench.harness import BenchSwarm, report, toy_swarm
from coordinator.bench.timing import summary, time_calls
from coordinator.client import SwarmClient
from coordinator.dispatch.spot import DEFAULT_SPOT_CHECK
from protos import tensors
from protos.toy_model import ToyConfig

WARMUP_CALLS = 3  # channels, sessions, allocator


def add_security_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=1408, help="expert FFN size (fine-grained experts, as Qwen-MoE/OLMoE)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 1], help="tokens per layer call (k=2)")
    p.add_argument("--repeats", type=int, default=40, help="timed calls per configuration")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--spot-tokens", type=int, default=64, help="tokens per layer call of the spot-check cost run (0: skip it)"
    )
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
    with toy_swarm(config, start_timeout=600) as bench:
        bench.start_peer("--allow-plaintext")
        with bench.client(hedge=False) as sealed, bench.client(hedge=False, secure=False) as plain:
            sealed.wait_for_experts()
            plain.wait_for_experts()
            for tokens in args.tokens:
                gen = torch.Generator().manual_seed(tokens)
                x = torch.randn(tokens, args.hidden, generator=gen).to(dtype)
                experts = torch.stack([torch.randperm(args.experts, generator=gen)[:2] for _ in range(tokens)])
                times = _alternate(sealed, plain, x, experts, bench.uids, args.repeats)
                s, p = summary(times["sealed"]), summary(times["plaintext"])
                results[f"{tokens}_tokens"] = {
                    "crypto_ms_in_process": _crypto_ms(x, experts, bench.uids),
                    "sealed": s,
                    "plaintext": p,
                    "overhead_ms": s["median_ms"] - p["median_ms"],
                    "overhead_pct": 100 * (s["median_ms"] / p["median_ms"] - 1),
                }
        if args.spot_tokens:
            results["spot_check"] = _spot_check_cost(bench, args, dtype)
    return report(results, args.json)


def _spot_check_cost(bench: BenchSwarm, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Layer calls with the default spot-check rate vs none, both sealed, against two replicas of
    every expert (one more peer), alternating. Includes the first calls, where peers without a
    verified history are checked more often: the cost of a coordinator's first minute."""
    bench.swarm.start_peer("peer1", bench.model_flag, str(bench.ckpt), "--experts", "*")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(args.spot_tokens, args.hidden, generator=gen).to(dtype)
    experts = torch.stack([torch.randperm(args.experts, generator=gen)[:2] for _ in range(args.spot_tokens)])
    with (
        bench.client(hedge=False, spot_check=DEFAULT_SPOT_CHECK) as checked,
        bench.client(hedge=False, spot_check=0.0) as unchecked,
    ):
        checked.wait_for_experts()
        unchecked.wait_for_experts()
        times = _alternate(checked, unchecked, x, experts, bench.uids, args.repeats, ("checked", "unchecked"))
        stats = checked.dispatcher.stats
    c, u = summary(times["checked"]), summary(times["unchecked"])
    answered = len(set(experts.reshape(-1).tolist())) * stats.layer_calls  # experts answered in all calls
    return {
        "rate": DEFAULT_SPOT_CHECK,
        "tokens": args.spot_tokens,
        "checked": c,
        "unchecked": u,
        "mean_overhead_pct": 100 * (statistics.fmean(times["checked"]) / statistics.fmean(times["unchecked"]) - 1),
        "median_overhead_pct": 100 * (c["median_ms"] / u["median_ms"] - 1),
        "experts_recomputed_pct": 100 * stats.spot_checks / max(answered, 1),
        "disputes": stats.spot_unresolved + stats.cheaters_banned,
    }


def _alternate(
    a: SwarmClient,
    b: SwarmClient,
    x: torch.Tensor,
    experts: torch.Tensor,
    uids: list[str],
    repeats: int,
    names: tuple[str, str] = ("sealed", "plaintext"),
) -> dict[str, list[float]]:
    """Milliseconds of `repeats` calls of each client, one of each in turn, after the warm-up calls."""
    times: dict[str, list[float]] = {names[0]: [], names[1]: []}
    for i in range(repeats + WARMUP_CALLS):
        for name, client in zip(names, (a, b), strict=True):
            start = time.perf_counter()
            client.dispatch(x, experts, uids, x.dtype)
            if i >= WARMUP_CALLS:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _crypto_ms(x: torch.Tensor, experts: torch.Tensor, uids: list[str], repeats: int = 20) -> float:
    """Both sides' security work for one request carrying all of a layer call's rows, without
    the network or compute: seal, open, digests, receipt signature and its check (median ms)."""
    from coordinator.dispatch import sealed
    from protos import envelope

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
