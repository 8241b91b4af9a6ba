"""`moe-swarm demo`: a local swarm serving a tiny Mixtral, text generated through it, checked locally.

Builds (once, seeded, cached) a tiny Mixtral-style checkpoint with a tokenizer, starts a
bootstrap DHT node and N peer processes on 127.0.0.1 that split its experts, generates
greedily through the swarm and with the local transformers model, and shows both token
streams, the largest logit difference, who served what and the latency; then stops every
process it started.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console

from coordinator.client import SwarmClient
from coordinator.commands.generate import greedy
from coordinator.models.hf import checkpoint_info, load_swarm_model
from coordinator.models.tiny import ensure_tiny_checkpoint
from coordinator.models.trained import ensure_trained, trained_ready
from coordinator.ops.report import print_swarm_summary
from coordinator.sim.local_swarm import LocalSwarm
from protos.expert_spec import expert_slices

TOLERANCE = 1e-5


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peers", type=int, default=3, help="peer processes (each hosts a slice of every layer)")
    p.add_argument("--family", default="mixtral", help="tiny model family (see coordinator/models/tiny.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=None, help="default: a line of Python (trained model) or a phrase (random)")
    p.add_argument(
        "--trained",
        action="store_true",
        help="serve the tiny MoE trained on the Python standard library (trained once, a few CPU-minutes; used "
        "without this flag whenever it is already in --cache): readable output instead of random bytes",
    )
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--cache", type=Path, default=Path(".cache"), help="where the seeded checkpoint is kept")


def demo_checkpoint(args: argparse.Namespace, console: Console) -> tuple[Path, str]:
    """The trained tiny MoE when asked for or already trained, else the seeded random one; and the prompt."""
    if args.trained or trained_ready(args.cache):
        moe, _ = ensure_trained(args.cache, say=lambda line: console.print(line, highlight=False))
        return moe, args.prompt or "def read_config(path):\n    "
    console.print(
        f"random tiny {args.family} (output is random bytes; `moe-swarm demo --trained` trains a readable one once)"
    )
    return ensure_tiny_checkpoint(args.cache, args.family, args.seed), args.prompt or "the swarm of experts"


def run_demo(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(soft_wrap=True)  # multiaddrs and token lists stay on one line
    ckpt, prompt = demo_checkpoint(args, console)
    info = checkpoint_info(ckpt)
    console.print(
        f"[bold]model[/] {info.manifest.model_id}: MoE layers {info.checkpoint.layers}, "
        f"{info.checkpoint.num_experts} experts each  ({ckpt})"
    )
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    local = AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="eager").eval()
    with LocalSwarm() as swarm:
        boot = swarm.start_bootstrap()
        console.print(f"bootstrap DHT node pid {boot.pid}: {swarm.initial_peers[0]}")
        specs = expert_slices(info.checkpoint.num_experts, args.peers)
        procs = swarm.start_peers(
            {f"peer{i}": ["--model", str(ckpt), "--experts", spec, "--threads", "1"] for i, spec in enumerate(specs)}
        )
        names = {p.info["peer_id"]: p.name for p in procs}
        hosted = {p.info["peer_id"]: spec for p, spec in zip(procs, specs, strict=True)}
        for p, spec in zip(procs, specs, strict=True):
            console.print(f"{p.name} pid {p.pid} at {p.info['endpoint']} hosts experts {spec}")
        with SwarmClient(swarm.initial_peers, info.uids) as client:
            client.wait_for_experts()
            remote = load_swarm_model(ckpt, client, info=info)
            experts_here = sum(p.numel() for n, p in remote.named_parameters() if ".experts." in n)
            with torch.inference_mode():
                logit_diff = (remote(ids).logits - local(ids).logits).abs().max().item()
            swarm_run = greedy(remote, ids, args.max_new_tokens)
            local_run = greedy(local, ids, args.max_new_tokens)
            stats = client.dispatcher.stats

    new = slice(ids.shape[-1], None)
    # the token ids are what is compared (a random model's text is byte-level gibberish)
    for label, run in (("through the swarm", swarm_run), ("local model      ", local_run)):
        console.print(
            f"[bold]{label}:[/] ids {run.output_ids[0, new].tolist()}  text "
            f"{tokenizer.decode(run.output_ids[0, new])!r}",
            markup=True,
            highlight=False,
        )
    print_swarm_summary(console, stats, names, hosted)
    same = torch.equal(swarm_run.output_ids, local_run.output_ids)
    console.print(
        f"swarm: {swarm_run.new_tokens / swarm_run.seconds:.1f} tokens/s, local: "
        f"{local_run.new_tokens / local_run.seconds:.1f} tokens/s; expert parameters on this machine: "
        f"{experts_here}"
    )
    ok = same and logit_diff <= TOLERANCE
    verdict = "[green]identical to the local model" if ok else "[red]DIFFERENT from the local model"
    console.print(
        f"{verdict}[/]: {swarm_run.new_tokens} greedy tokens {'equal' if same else 'differ'}, max logit "
        f"diff {logit_diff:.2e} (tolerance {TOLERANCE:g}); all processes stopped"
    )
    return 0 if ok else 1
