"""`moe-swarm bench layer --relayed`: the same layer call to a direct peer (gRPC) and to a peer
served through a circuit relay (libp2p), side by side in one run on 127.0.0.1.

Two peers host the same layer shape from two seeded checkpoints (so each client's experts
live on exactly one of them); blocks of calls to each alternate, so the VM's phases fall into
both medians alike.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from coordinator.bench.harness import (
    WEIGHTS_SEED,
    hivemind_matched_ffn,
    layer_input,
    local_layer,
    remote_layer,
    report,
    toy_swarm,
)
from coordinator.bench.timing import spread, summary, time_calls
from coordinator.client import SwarmClient
from protos import toy_model
from protos.toy_model import ToyConfig


def run_relayed_layer_bench(args: argparse.Namespace) -> dict:
    ffn = args.ffn or hivemind_matched_ffn(args.hidden)
    config = ToyConfig(num_layers=1, num_experts=args.experts, hidden_dim=args.hidden, ffn_dim=ffn, top_k=args.k)
    x = layer_input(args.tokens, args.hidden)
    with toy_swarm(config) as bench, contextlib.ExitStack() as stack:
        relayed_ckpt = bench.ckpt.parent / "ckpt-relayed"
        toy_model.save_checkpoint(relayed_ckpt, config, seed=WEIGHTS_SEED + 1)
        common = ["--experts", "*", "--checkpoint"]
        bench.swarm.start_peers(
            {"direct": [*common, str(bench.ckpt)], "relayed": [*common, str(relayed_ckpt), "--relay", "always"]}
        )
        clients = {
            "direct": stack.enter_context(bench.client()),
            "relayed": stack.enter_context(
                SwarmClient(bench.swarm.initial_peers, toy_model.read_manifest(relayed_ckpt).uids(), refresh_period=60)
            ),
        }
        layers = {}
        ckpts = {"direct": bench.ckpt, "relayed": relayed_ckpt}
        for name, ckpt in ckpts.items():
            clients[name].wait_for_experts()
            layers[name] = remote_layer(ckpt, clients[name])
        stack.enter_context(torch.inference_mode())
        diff = max((layers[n](x) - local_layer(c)(x)).abs().max().item() for n, c in ckpts.items())
        times: dict[str, list[float]] = {"direct": [], "relayed": [], "direct_1": [], "relayed_1": []}
        for layer in layers.values():
            time_calls(lambda layer=layer: layer(x), 0)  # warm-up: connections, sessions
        for n in spread(args.repeats, args.rounds):
            for name, layer in layers.items():
                times[name] += time_calls(lambda layer=layer: layer(x), n, warmup=0)
                times[f"{name}_1"] += time_calls(lambda layer=layer: layer(x[:1]), n, warmup=0)
        compute = {n: statistics.median(c.dispatcher.stats.peer_compute_ms) for n, c in clients.items()}
        via = _connection(clients["relayed"])
    result = _result(args, ffn, times, compute)
    result["max_abs_diff_vs_local"] = diff  # both swarm layers compute what the layer computes in-process
    result["relayed_connection"] = via  # the coordinator's libp2p connection: through the relay, not direct
    return report(result, args.json)


def _connection(client: SwarmClient) -> list[str]:
    link = client.channels.link
    reaches = {r.record.reach for rs in client.swarm.snapshot().values() for r in rs if r.record.reach is not None}
    if link is None or not reaches:
        return []
    return client.io.run(link.connections(next(iter(reaches))))


def _result(args: argparse.Namespace, ffn: int, times: dict[str, list[float]], compute: dict[str, float]) -> dict:
    med = {name: summary(t)["median_ms"] for name, t in times.items()}
    return {
        "tokens": args.tokens,
        "experts": args.experts,
        "k": args.k,
        "hidden": args.hidden,
        "ffn": ffn,
        "rounds": args.rounds,
        "direct_ms": med["direct"],
        "relayed_ms": med["relayed"],
        "relayed_over_direct": med["relayed"] / med["direct"],
        "relayed_extra_ms": med["relayed"] - med["direct"],
        "direct_1_token_ms": med["direct_1"],
        "relayed_1_token_ms": med["relayed_1"],
        "relayed_1_token_extra_ms": med["relayed_1"] - med["direct_1"],
        "peer_compute_ms": compute,  # the expert math each peer reports: the same work on both paths
        "relayed_p99_ms": summary(times["relayed"])["p99_ms"],
    }
