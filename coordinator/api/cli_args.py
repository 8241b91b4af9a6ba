"""The flags of `moe-swarm api` (no server imports: the parser is built for every command)."""

from __future__ import annotations

import argparse
from pathlib import Path

from coordinator.dispatch.dispatcher import FALLBACK_POLICIES
from protos import tensors


def add_api_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face MoE checkpoint: a folder (with tokenizer) or org/name")
    p.add_argument("--revision", default=None, help="with a Hub repo id: branch, tag or commit")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of DHT nodes of the swarm")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0 picks a free one)")
    p.add_argument("--dtype", default=None, choices=sorted(tensors.DTYPES), help="default: the checkpoint's")
    p.add_argument("--max-active", type=int, default=16, help="sequences in the running batch")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; past it: 429")
    p.add_argument(
        "--max-kv-tokens", type=int, default=None,
        help="KV cache positions all running sequences may reserve, prompt + max_tokens each "
        "(default: --max-active x the model's context)",
    )  # fmt: skip
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens fed per step (all sequences together)")
    p.add_argument(
        "--min-coverage", type=float, default=1.0,
        help="fraction of experts that must have a live replica to accept requests (else 503 + Retry-After)",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=30.0, help="seconds one layer call may take")
    p.add_argument("--fallback", default="reroute", choices=FALLBACK_POLICIES, help="as for generate")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="seconds SIGTERM waits for running requests")
    p.add_argument("--threads", type=int, default=None, help="torch threads per sequence forward (default: torch's)")
    p.add_argument("--key-file", type=Path, default=None, help="this coordinator's identity")
    p.add_argument("--ready-file", type=Path, default=None, help="write the bound address here as JSON once up")
