"""`moe-swarm generate`: text generation with a Hugging Face MoE checkpoint whose experts run in the swarm."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.client import SwarmClient
from coordinator.dispatch import layer_call, trust
from coordinator.dispatch.dispatcher import FALLBACK_POLICIES
from coordinator.dispatch.spot import DEFAULT_SPOT_CHECK
from coordinator.models.hf import checkpoint_info, load_swarm_model
from coordinator.ops.console import console as make_console
from coordinator.ops.report import print_swarm_summary
from coordinator.ops.watch import SwarmWatch
from coordinator.speculate.options import add_speculate_args, check_speculate_args, controller_for, make_draft
from protos import tensors
from protos.envelope import Identity
from protos.records import parse_expert_uid


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="Hugging Face MoE checkpoint: a folder (with tokenizer), or a Hub repo id org/name (downloads config, "
        "tokenizer and the dense weights only; HF_TOKEN, HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE apply)",
    )
    p.add_argument("--revision", default=None, help="with a Hub repo id: branch, tag or commit (default: main)")
    p.add_argument(
        "--dry-run", action="store_true", help="with a Hub repo id: print what would be downloaded, download nothing"
    )
    p.add_argument("--prompt", help="text to continue (required unless --dry-run)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--initial-peers", nargs="+", help="multiaddrs of DHT nodes of the swarm (required unless --dry-run)"
    )
    p.add_argument("--dtype", default=None, choices=sorted(tensors.DTYPES), help="default: the checkpoint's")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds one layer call may take")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for every expert to have a replica")
    p.add_argument(
        "--min-coverage",
        type=float,
        default=1e-9,
        help="after --wait, stop unless this fraction of the experts has a replica (default: any; 0 runs even "
        "with none, every token rerouted or dropped)",
    )
    p.add_argument(
        "--fallback",
        default="reroute",
        choices=FALLBACK_POLICIES,
        help="when no replica of an expert answers in time: use the token's next-best expert, drop it "
        "(renormalise over the others), or stop with an error; every case is counted",
    )
    p.add_argument("--no-hedge", action="store_true", help="never send hedged duplicates to a second replica")
    p.add_argument(
        "--spot-check",
        type=float,
        default=DEFAULT_SPOT_CHECK,
        help="base fraction of expert answers recomputed on another replica to catch wrong results (0-1; peers "
        "without a verified history are checked more); 0 turns checks off",
    )
    p.add_argument(
        "--trust-store",
        type=Path,
        default=trust.default_path(),
        help="file keeping bans of proven cheaters and peers' verified history across runs",
    )
    p.add_argument(
        "--key-file", type=Path, default=None, help="this coordinator's identity (for private swarms' allowlists)"
    )
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on 127.0.0.1:PORT")
    add_speculate_args(p)


@dataclass
class Generation:
    prompt_ids: torch.Tensor
    output_ids: torch.Tensor  # prompt + new tokens
    seconds: float

    @property
    def new_tokens(self) -> int:
        return self.output_ids.shape[-1] - self.prompt_ids.shape[-1]


def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, streamer=None) -> Generation:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
            attention_mask=torch.ones_like(input_ids),
        )
    return Generation(input_ids, out, time.perf_counter() - start)


def print_dry_run(model: str, revision: str | None) -> int:
    from protos.weights import COORDINATOR, describe, is_hub_id, open_checkpoint

    if not is_hub_id(model):
        raise ValueError(f"--dry-run needs a Hub repo id; {model} is a local folder: nothing to download")
    print(describe(open_checkpoint(model, revision).plan(COORDINATOR)))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    console = make_console(stderr=True)
    # a person watching one generation wants to see each ban as it happens (a simulation does not)
    logging.getLogger(layer_call.__name__).setLevel(logging.INFO)
    if args.dry_run:
        return print_dry_run(args.model, args.revision)
    if not 0 <= args.min_coverage <= 1:
        raise ValueError(f"--min-coverage must be between 0 and 1, got {args.min_coverage}")
    needed = {"--prompt": args.prompt, "--initial-peers": args.initial_peers}
    if missing := [flag for flag, value in needed.items() if not value]:
        raise ValueError(f"generate needs {' and '.join(missing)}")
    check_speculate_args(args)
    info = checkpoint_info(args.model, args.revision)
    tokenizer = AutoTokenizer.from_pretrained(info.checkpoint.path)
    dtype = tensors.dtype_from_name(args.dtype) if args.dtype else None
    identity = Identity.load_or_create(args.key_file) if args.key_file else None
    with SwarmClient(
        args.initial_peers,
        info.uids,
        timeout=args.timeout,
        fallback=args.fallback,
        hedge=not args.no_hedge,
        identity=identity,
        spot_check=args.spot_check,
        metrics_port=args.metrics_port,
        trust_store=args.trust_store,
    ) as client:
        console.print(f"model {info.manifest.model_id}: waiting for {len(info.uids)} experts in the swarm")
        wait_for_coverage(client, args, console)
        model = load_swarm_model(info.checkpoint.path, client, dtype, info)
        return generate_through(client, args, model, tokenizer, console)


def generate_through(client: SwarmClient, args: argparse.Namespace, model, tokenizer, console) -> int:
    """Stream the continuation (speculating if asked), then say how it went and what the swarm did;
    Ctrl-C ends it early with the same report (exit 130)."""
    from coordinator.speculate.decode import speculative_generate

    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    # the continuation's first token carries its own leading space or newline, so nothing is
    # inserted between them; on a terminal the prompt is dim, so where it ends shows
    dim, plain = ("\x1b[2m", "\x1b[0m") if sys.stdout.isatty() else ("", "")
    print(f"{dim}{args.prompt}{plain}", end="", flush=True)
    streamer = CountingStreamer(tokenizer)
    watch = SwarmWatch(client.swarm, client.dispatcher.health, console.print, args.fallback).start()
    start, spec = time.perf_counter(), None
    try:
        if args.speculate == "off":
            result = greedy(model, ids, args.max_new_tokens, streamer)
        else:
            draft = make_draft(args.speculate, model, args.draft_model)
            result = spec = speculative_generate(
                model, ids, draft, args.max_new_tokens, streamer=streamer, controller=controller_for(args)
            )
    except KeyboardInterrupt:  # what was generated so far, and what the swarm did for it
        seconds, rc = time.perf_counter() - start, 130
        print(flush=True)
        console.print(f"interrupted (Ctrl-C) after {max(streamer.tokens, 0)} tokens in {seconds:.2f}s")
    else:
        rc = 0
        print(flush=True)
        console.print(
            f"{result.new_tokens} tokens in {result.seconds:.2f}s: "
            f"{result.new_tokens / result.seconds:.2f} tokens/s"
        )
        if spec is not None:
            console.print(spec.stats.summary())
    watch.stop()
    print_swarm_summary(console, client.dispatcher.stats, hosted=watch.hosted(), fates=watch.fates())
    return rc


def wait_for_coverage(client: SwarmClient, args: argparse.Namespace, console) -> None:
    """Wait up to --wait for every expert to have a replica, saying how many do; then stop with an
    error below --min-coverage (a wrong checkpoint or swarm would otherwise "succeed" with
    every token dropped), or warn and go on with the fallback."""
    try:
        client.wait_for_experts(
            timeout=args.wait,
            progress=lambda n, total, left: console.print(
                f"experts with a replica: {n}/{total}" + (f" ({left:.0f}s left to wait)" if n < total else "")
            ),
        )
        return
    except TimeoutError as e:
        if args.fallback == "error":
            raise
        problem = str(e)
    uids = client.swarm.uids
    covered = sum(bool(client.swarm.replicas(u)) for u in uids)
    if covered < args.min_coverage * len(uids):
        raise ValueError(
            f"only {covered} of {len(uids)} experts of this checkpoint have a replica in the swarm after "
            f"{args.wait:.0f}s; {other_models_hint(client)} (--min-coverage 0 runs anyway)"
        )
    console.print(f"[yellow]warning:[/] {problem}; continuing with the {args.fallback} fallback")


MAX_MODELS_NAMED = 5


def other_models_hint(client: SwarmClient) -> str:
    """What the swarm serves instead: other weights of the same family, named by model id."""
    own = parse_expert_uid(client.swarm.uids[0])[0]
    try:
        served = client.io.run(client.swarm.models_served(), timeout=10)
    except Exception:  # the hint is a courtesy: the error stands without it
        served = {}
    others = {m: n for m, n in served.items() if m != own}
    if not others:
        return "no peer in it serves another model of this family either: check --initial-peers"
    return (
        f"its peers serve other weights of this family: {name_models(others)}. Use the checkpoint they serve (the "
        f"model id is the config and weight files' digest: `moe-swarm status --model MODEL_ID` shows who serves it)"
    )


def name_models(served: dict[str, int]) -> str:
    """'a (3 peers), b (1 peer) and 4 more': the most served first, at most MAX_MODELS_NAMED of them
    (the records are anyone's, and the error stays one line)."""
    most = sorted(served.items(), key=lambda mn: (-mn[1], mn[0]))[:MAX_MODELS_NAMED]
    listed = ", ".join(f"{m} ({n} peer{'s' if n > 1 else ''})" for m, n in most)
    return listed + (f" and {len(served) - len(most)} more" if len(served) > len(most) else "")


class CountingStreamer:
    """Streams through transformers' TextStreamer and counts the new tokens, so an interrupted
    run can say how far it got (generate calls `put` with the prompt first, then each token)."""

    def __init__(self, tokenizer) -> None:
        from transformers import TextStreamer

        self.text = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.tokens = -1  # the first put is the prompt

    def put(self, value: torch.Tensor) -> None:
        self.tokens += 1 if self.tokens < 0 else value.numel()
        self.text.put(value)

    def end(self) -> None:
        self.text.end()
