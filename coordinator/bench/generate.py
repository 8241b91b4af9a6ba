"""`moe-swarm bench generate`: greedy generation through a local swarm vs the same model run locally."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from coordinator.bench.harness import local_hf_model, report, tiny_hf_swarm
from protos.expert_spec import expert_slices


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
    from coordinator.commands.generate import greedy
    from coordinator.models.hf import load_swarm_model
    from coordinator.models.tiny import VOCAB

    sizes = {"hidden_size": args.hidden, "intermediate_size": args.ffn, "num_hidden_layers": args.layers}
    with tiny_hf_swarm(args.family, **sizes) as (bench, info):
        bench.start_peers(expert_slices(info.checkpoint.num_experts, args.peers), "--threads", "1")
        ids = torch.randint(0, VOCAB, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        local = local_hf_model(bench.ckpt)
        with bench.client() as client:
            client.wait_for_experts()
            remote = load_swarm_model(bench.ckpt, client, info=info)
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
    return report(result, args.json)
