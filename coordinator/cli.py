"""moe-swarm: the client side of the swarm.

moe-swarm bootstrap            run a DHT bootstrap node (and relay), print its multiaddrs
moe-swarm demo                 local swarm serving a tiny Mixtral; generation through it = local model
moe-swarm api                  an OpenAI-compatible HTTP API over the swarm, continuous batching
moe-swarm generate             generate text with a Hugging Face MoE model whose experts run in the swarm
moe-swarm status               per expert: replicas, state, load, throughput, record expiry (from the DHT)
moe-swarm dashboard            the same as a live web page: coverage map (layers x experts) and peer health
moe-swarm bench layer          one layer call: swarm vs in-process vs hivemind
moe-swarm bench generate       tokens/s of one sequence behind an RTT vs its floor, with and without speculation
moe-swarm bench api            the API gateway: aggregate tokens/s, TTFT and inter-token latency per client count
moe-swarm simulate             churn: peers killed/stopped/stalled/restarted under load, report + JSON + plot
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from coordinator.dispatch.dispatcher import DispatchError
from protos.plumbing.cliconfig import install as with_config
from protos.plumbing.dht import SwarmJoinError


def build_parser() -> argparse.ArgumentParser:
    from coordinator.api.cli_args import add_api_args
    from coordinator.bench.api import add_api_bench_args
    from coordinator.bench.generate import add_generate_bench_args
    from coordinator.bench.layer import add_layer_args
    from coordinator.bench.saturation import add_saturation_bench_args
    from coordinator.bench.security import add_security_bench_args
    from coordinator.bench.straggler import add_straggler_bench_args
    from coordinator.commands.bootstrap import add_bootstrap_args
    from coordinator.commands.demo import add_demo_args
    from coordinator.commands.generate import add_generate_args
    from coordinator.ops.dashboard import add_dashboard_args
    from coordinator.ops.status import add_status_args
    from coordinator.sim.simulate import add_simulate_args

    parser = argparse.ArgumentParser(prog="moe-swarm", description="Run MoE models on a swarm of expert peers.")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bootstrap_args(sub.add_parser("bootstrap", help="run a DHT node that peers and coordinators join; a relay"))
    add_demo_args(sub.add_parser("demo", help="start a local swarm, generate through it, compare with local"))
    add_api_args(sub.add_parser("api", help="serve the model as an OpenAI-compatible HTTP API (continuous batching)"))
    add_generate_args(sub.add_parser("generate", help="generate text with a MoE model whose experts run in the swarm"))
    add_status_args(sub.add_parser("status", help="the swarm's replicas of every expert of a model, from the DHT"))
    add_dashboard_args(sub.add_parser("dashboard", help="a live web page of the swarm: coverage map and peer health"))
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    add_layer_args(bench.add_parser("layer", help="latency of one MoE layer call"))
    add_api_bench_args(bench.add_parser("api", help="the API gateway: tokens/s, TTFT, inter-token per client count"))
    add_generate_bench_args(bench.add_parser("generate", help="tokens/s behind an RTT vs the floor, with speculation"))
    add_straggler_bench_args(bench.add_parser("straggler", help="layer latency with a stalled peer, hedging on/off"))
    add_saturation_bench_args(bench.add_parser("saturation", help="rows/s a saturated peer serves vs raw compute"))
    add_security_bench_args(bench.add_parser("security", help="a layer call sealed + signed vs plaintext"))
    add_simulate_args(sub.add_parser("simulate", help="a churning local swarm under load: faults, report, JSON, plot"))
    return with_config(parser, "MOE_SWARM")  # every flag also from MOE_SWARM_* and --config FILE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.command in ("demo", "bench", "simulate"):
        # these share the machine's cores with the peers they start: one torch thread here
        # stops OpenMP spin-waiting from starving them
        import torch

        torch.set_num_threads(1)
    from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

    try:
        if args.command == "bootstrap":
            from coordinator.commands.bootstrap import run_bootstrap

            return run_bootstrap(args)
        return run_command(args)
    except (DispatchError, TimeoutError, ValueError, FileNotFoundError, PermissionError, SwarmJoinError) as e:
        print(f"moe-swarm: error: {e}", file=sys.stderr)
        return 1
    except P2PDaemonError as e:  # no DHT node answered at --initial-peers
        print(f"moe-swarm: error: cannot join the swarm through --initial-peers: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("moe-swarm: interrupted", file=sys.stderr)
        return 130


def run_command(args: argparse.Namespace) -> int:
    if args.command in ("demo", "generate", "bench", "simulate", "api"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own output is the report; keep it readable
    if args.command == "simulate":
        from coordinator.sim.simulate import run_simulate

        return run_simulate(args)
    if args.command == "demo":
        from coordinator.commands.demo import run_demo

        return run_demo(args)
    if args.command == "status":
        from coordinator.ops.status import run_status

        return run_status(args)
    if args.command == "dashboard":
        from coordinator.ops.dashboard import run_dashboard

        return run_dashboard(args)
    if args.command == "api":
        from coordinator.api.command import run_api

        return run_api(args)
    if args.command == "generate":
        from coordinator.commands.generate import run_generate

        return run_generate(args)
    if args.command == "bench":
        from coordinator.bench import api, generate, layer, saturation, security, straggler

        run = {
            "api": api.run_api_bench,
            "layer": layer.run_layer_bench,
            "generate": generate.run_generate_bench,
            "straggler": straggler.run_straggler_bench,
            "saturation": saturation.run_saturation_bench,
            "security": security.run_security_bench,
        }[args.bench]
        print(json.dumps(run(args), indent=2))
        return 0
    raise AssertionError(args)
