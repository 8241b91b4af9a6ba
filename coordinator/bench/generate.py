"""`moe-swarm bench generate`: one sequence's generation through a swarm whose peers sit
behind a round-trip time, against the floor that time sets, with and without speculation.

The model is the tiny MoE trained on the standard library's sources (coordinator/models/
trained.py: 8 MoE layers, 8 experts, top-2) with its experts over `--peers` peer processes,
each behind a delay link of the given RTT (coordinator/sim/delay_link.py). Per RTT:

    floor = MoE layers x RTT + local compute per token

where local compute is the same checkpoint run by transformers in this process (no network),
measured in the same run. Greedy decoding of a code-like prompt, without speculation and
then with each draft; every speculative output is checked token for token.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from coordinator.bench.harness import report
from coordinator.bench.link_probe import link_round_trip_ms
from coordinator.speculate.drafts import DRAFT_KINDS

PROMPT = (
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "    def __repr__(self):\n        return f'Point({self.x}, {self.y})'\n\n"
    "class Size:\n    def __init__(self, width, height):\n"
)


def _rtts(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rtt-ms takes comma-separated milliseconds, got {text!r}") from None
    if not values or any(not 0 <= v <= 1000 for v in values):
        raise argparse.ArgumentTypeError(f"--rtt-ms values must be in 0..1000 ms, got {text!r}")
    return values


def _kinds(text: str) -> list[str]:
    kinds = [k for k in text.split(",") if k]
    if unknown := [k for k in kinds if k not in DRAFT_KINDS]:
        raise argparse.ArgumentTypeError(f"--drafts: unknown {unknown}; known: {', '.join(DRAFT_KINDS)}")
    return kinds


def add_generate_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtt-ms", type=_rtts, default=[0.0, 20.0, 50.0], help="round-trip times to run, e.g. 0,20,50")
    p.add_argument("--peers", type=int, default=4, help="peer processes the experts are split over")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--drafts", type=_kinds, default=list(DRAFT_KINDS), help="draft kinds to run, e.g. lookup,trunk")
    p.add_argument("--max-draft", type=int, default=8, help="most tokens drafted for one pass")
    p.add_argument("--cache", type=Path, default=Path(".cache"), help="where the trained models are kept")
    p.add_argument("--json", type=Path, default=None, help="write the results here")


def _timed(fn) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def _plain(model, client, ids, new_tokens: int) -> tuple[dict, torch.Tensor]:
    from coordinator.commands.generate import greedy

    stats = client.dispatcher.stats
    calls0, rpcs0 = stats.layer_calls, stats.rpcs
    run = greedy(model, ids, new_tokens)
    calls, rpcs = stats.layer_calls - calls0, stats.rpcs - rpcs0
    ms = run.seconds * 1e3 / run.new_tokens
    return {
        "ms_per_token": ms,
        "tokens_per_s": 1e3 / ms,
        "layer_calls_per_token": calls / run.new_tokens,
        "peers_per_layer_call": rpcs / max(calls, 1),
    }, run.output_ids


def _speculative(model, ids, kind: str, draft_path: Path, want: torch.Tensor, args) -> dict:
    from coordinator.speculate import DraftLength, speculative_generate
    from coordinator.speculate.options import make_draft

    draft = make_draft(kind, model, draft_path)
    run = speculative_generate(model, ids, draft, args.max_new_tokens, controller=DraftLength(args.max_draft))
    stats = run.stats.as_dict()
    return {
        "tokens_per_s": run.new_tokens / run.seconds,
        "ms_per_token": run.seconds * 1e3 / run.new_tokens,
        "identical": run.output_ids.tolist() == want.tolist(),
        **{k: v for k, v in stats.items() if k != "draft"},
    }


def _one_rtt(rtt: float, moe: Path, draft: Path, ids: torch.Tensor, local_ms: float, args) -> dict:
    from coordinator.client import SwarmClient
    from coordinator.commands.generate import greedy
    from coordinator.models.hf import checkpoint_info, load_swarm_model
    from coordinator.sim.local_swarm import LocalSwarm
    from protos.expert_spec import expert_slices

    info = checkpoint_info(moe)
    layers = len(info.checkpoint.layers)
    with LocalSwarm(rtt_ms=rtt) as swarm:
        swarm.start_bootstrap()
        specs = expert_slices(info.checkpoint.num_experts, args.peers)
        swarm.start_peers(
            {f"peer{i}": ["--model", str(moe), "--experts", s, "--threads", "1"] for i, s in enumerate(specs)}
        )
        with SwarmClient(swarm.initial_peers, info.uids, refresh_period=60) as client:
            client.wait_for_experts()
            model = load_swarm_model(moe, client, info=info)
            greedy(model, ids, 4)  # warm-up: channels, sessions, allocator
            plain, want = _plain(model, client, ids, args.max_new_tokens)
            floor = layers * rtt + local_ms
            row = {"rtt_ms": rtt, "moe_layers": layers, "floor_ms": floor, **plain}
            row["over_floor"] = plain["ms_per_token"] / floor
            if rtt > 0:  # what the emulated link itself takes per round trip on this machine now
                row.update(link_round_trip_ms(swarm, rtt))
                row["over_link_floor"] = plain["ms_per_token"] / (layers * row["link_rtt_p50_ms"] + local_ms)
            row["speculative"] = {k: _speculative(model, ids, k, draft, want, args) for k in args.drafts}
    best = max((s["tokens_per_s"] for s in row["speculative"].values()), default=float("nan"))
    row["best_speculative_over_plain"] = best / plain["tokens_per_s"]
    return row


def _local_ms_per_token(moe: Path, ids: torch.Tensor, new_tokens: int) -> float:
    from coordinator.bench.harness import local_hf_model
    from coordinator.commands.generate import greedy

    local = local_hf_model(moe)
    greedy(local, ids, 4)
    runs = [greedy(local, ids, new_tokens) for _ in range(3)]
    return min(r.seconds * 1e3 / r.new_tokens for r in runs)


def run_generate_bench(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from coordinator.models.trained import ensure_trained

    moe, draft = ensure_trained(args.cache)
    ids = AutoTokenizer.from_pretrained(moe)(PROMPT, return_tensors="pt").input_ids
    local_ms = _local_ms_per_token(moe, ids, args.max_new_tokens)
    rows = [_one_rtt(rtt, moe, draft, ids, local_ms, args) for rtt in args.rtt_ms]
    result = {"prompt_tokens": ids.shape[1], "new_tokens": args.max_new_tokens, "local_ms_per_token": local_ms}
    result["rows"] = rows
    _print_table(rows, args.drafts)
    return report(result, args.json)


def _print_table(rows: list[dict], kinds: list[str]) -> None:
    head = ["RTT ms", "link p50", "floor ms/tok", "plain ms/tok", "plain tok/s", "/ floor", "/ link floor"]
    head += ["calls/tok", "peers/call"]
    head += [f"{k} tok/s (acc)" for k in kinds] + ["best / plain"]
    print(" | ".join(head))
    for r in rows:
        link = r.get("link_rtt_p50_ms", 0.0)
        cells = [f"{r['rtt_ms']:.0f}", f"{link:.1f}", f"{r['floor_ms']:.1f}", f"{r['ms_per_token']:.1f}"]
        cells += [
            f"{r['tokens_per_s']:.2f}",
            f"{r['over_floor']:.2f}",
            f"{r.get('over_link_floor', r['over_floor']):.2f}",
        ]
        cells += [f"{r['layer_calls_per_token']:.1f}", f"{r['peers_per_layer_call']:.2f}"]
        for k in kinds:
            s = r["speculative"][k]
            mark = "" if s["identical"] else " DIFFERENT"
            cells.append(f"{s['tokens_per_s']:.2f} ({s['acceptance']:.2f}){mark}")
        cells.append(f"{r['best_speculative_over_plain']:.2f}")
        print(" | ".join(cells), flush=True)
