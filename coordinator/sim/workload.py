"""What the simulated coordinators send, and the threads that send it and record each request."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from coordinator.client import SwarmClient


@dataclass
class Workload:
    """What a coordinator sends: `requests[i % n]` is request i; `check` compares with the local reference."""

    uids: list[str]
    make_runner: Callable[[SwarmClient], Callable[[int], object]]
    check: Callable[[int, object], bool]
    tokens_per_request: int
    peer_args: list[str]
    expert_bytes: int
    num_experts: int


def generation_workload(args: argparse.Namespace) -> Workload:
    from transformers import AutoModelForCausalLM

    from coordinator.commands.generate import greedy
    from coordinator.models.hf import checkpoint_info, load_swarm_model
    from coordinator.models.tiny import VOCAB, ensure_tiny_checkpoint
    from protos.hf_checkpoint import HFCheckpoint

    ckpt = ensure_tiny_checkpoint(args.cache, args.family, args.model_seed)
    info = checkpoint_info(ckpt)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, VOCAB, (1, args.prompt_tokens), generator=gen) for _ in range(8)]
    local = AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="eager").eval()
    want = [greedy(local, ids, args.new_tokens).output_ids for ids in prompts]
    one = HFCheckpoint(ckpt).read_expert(*min(info.checkpoint.experts))

    def make_runner(client: SwarmClient) -> Callable[[int], object]:
        model = load_swarm_model(ckpt, client, info=info)
        return lambda i: greedy(model, prompts[i % len(prompts)], args.new_tokens).output_ids

    return Workload(
        uids=info.uids,
        make_runner=make_runner,
        check=lambda i, out: torch.equal(out, want[i % len(want)]),
        tokens_per_request=args.new_tokens,
        peer_args=["--model", str(ckpt)],
        expert_bytes=sum(t.numel() * t.element_size() for t in one.values()),
        num_experts=info.checkpoint.num_experts,
    )


def layer_workload(args: argparse.Namespace) -> Workload:
    from coordinator.models.toy_stack import LocalExperts, ToyMoEStack
    from protos import toy_model
    from protos.toy_model import ToyConfig

    config = ToyConfig(num_layers=2, num_experts=8, hidden_dim=64, ffn_dim=128, top_k=2)
    ckpt = args.cache / f"toy-s{args.model_seed}"
    if not (ckpt / "moe_swarm.json").is_file():
        toy_model.save_checkpoint(ckpt, config, seed=args.model_seed)
    manifest = toy_model.read_manifest(ckpt)
    gen = torch.Generator().manual_seed(args.seed)
    inputs = [torch.randn(args.tokens, config.hidden_dim, generator=gen) for _ in range(8)]
    local = ToyMoEStack.from_checkpoint(ckpt, LocalExperts.from_checkpoint(ckpt))
    want = [local(x) for x in inputs]

    def make_runner(client: SwarmClient) -> Callable[[int], object]:
        stack = ToyMoEStack.from_checkpoint(ckpt, client)
        return lambda i: stack(inputs[i % len(inputs)])

    return Workload(
        uids=manifest.uids(),
        make_runner=make_runner,
        check=lambda i, out: (out - want[i % len(want)]).abs().max().item() <= 1e-5,
        tokens_per_request=args.tokens,
        peer_args=["--checkpoint", str(ckpt)],
        expert_bytes=3 * config.hidden_dim * config.ffn_dim * 4,
        num_experts=config.num_experts,
    )


@dataclass
class RequestRecord:
    t: float  # start, seconds after the load started
    ms: float
    ok: bool
    match: bool  # equal to the local model's answer
    coordinator: int
    error: str = ""


class LoadThread(threading.Thread):
    """One coordinator's request loop: back to back until stopped."""

    def __init__(
        self, index: int, client: SwarmClient, run: Callable[[int], object], check, t0: float, rate: float = 0.0
    ) -> None:
        super().__init__(name=f"load-{index}", daemon=True)  # daemon: a hung RPC never blocks exit
        self.index, self.client, self.run_one, self.check, self.t0 = index, client, run, check, t0
        self.rate = rate
        self.records: list[RequestRecord] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = self.index * 1000  # coordinators cycle through the prompts from different offsets
        sent = 0
        while not self.stop.is_set():
            if self.rate > 0 and self.stop.wait(max(0.0, self.t0 + sent / self.rate - time.monotonic())):
                break  # paced: request n starts at n / rate (later if the previous one ran long)
            sent += 1
            start = time.monotonic()
            try:
                out = self.run_one(i)
                ok, match, error = True, self.check(i, out), ""
            except Exception as e:  # a failure reaching the user: counted, never hidden
                ok, match, error = False, False, f"{type(e).__name__}: {e}"[:300]
            self.records.append(
                RequestRecord(start - self.t0, (time.monotonic() - start) * 1e3, ok, match, self.index, error)
            )
            i += 1
