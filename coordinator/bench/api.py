"""`moe-swarm bench api`: the OpenAI gateway under 1, 4, 16 ... concurrent streaming clients.

A tiny seeded checkpoint, peers on 127.0.0.1 (behind delay links with --rtt-ms), one
`moe-swarm api` process; each client streams one greedy completion of its own prompt.
Reported per RTT and client count: aggregate tokens/s (every client's tokens over the
wall time of the round), time to first token and inter-token gaps (p50/p99), and the
aggregate's ratio to one client's at the same RTT.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from coordinator.bench.harness import INPUT_SEED, BenchSwarm, report, tiny_hf_swarm
from coordinator.dispatch.stats import percentile
from protos.expert_spec import expert_slices


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def add_api_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=_int_list, default=[1, 4, 16], help="concurrent clients per round, e.g. 1,4,16")
    p.add_argument("--rtt-ms", type=_float_list, default=[0.0], help="peer round-trip times to emulate, e.g. 0,50")
    p.add_argument("--family", default="mixtral", help="tiny model family (coordinator/models/tiny.py)")
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny model")
    p.add_argument("--ffn", type=int, default=512, help="expert FFN size")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens each client asks for")
    p.add_argument("--json", type=Path, default=None, help="write the results here")


@dataclass
class Stream:
    """One client's streamed completion, as timed on the client."""

    tokens: int = 0
    ttft: float = float("nan")
    gaps: list[float] = field(default_factory=list)  # between successive chunks that carried text
    error: str | None = None


def stream_completion(port: int, body: dict) -> Stream:
    out = Stream()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = last = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            out.error = f"HTTP {response.status}: {response.read()[:200]!r}"
            return out
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                out.tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices") and chunk["choices"][0]["text"]:
                if out.ttft != out.ttft:  # first text
                    out.ttft = now - start
                else:
                    out.gaps.append(now - last)
                last = now
    finally:
        conn.close()
    return out


def run_round(port: int, prompts: list[list[int]], model: str, max_tokens: int) -> dict:
    streams: list[Stream] = [Stream() for _ in prompts]
    barrier = threading.Barrier(len(prompts))

    def client(i: int) -> None:
        body = {"model": model, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        barrier.wait()
        streams[i] = stream_completion(port, body)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    errors = [s.error for s in streams if s.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(prompts)} clients failed, e.g. {errors[0]}")
    tokens = sum(s.tokens for s in streams)
    gaps = [g * 1e3 for s in streams for g in s.gaps]
    return {
        "clients": len(prompts),
        "tokens": tokens,
        "seconds": seconds,
        "aggregate_tokens_per_s": tokens / seconds,
        "ttft_p50_ms": percentile([s.ttft * 1e3 for s in streams], 50),
        "inter_token_p50_ms": percentile(gaps, 50),
        "inter_token_p99_ms": percentile(gaps, 99),
    }


def _start_gateway(bench: BenchSwarm, max_active: int) -> int:
    argv = ["-m", "coordinator", "api", "--model", str(bench.ckpt), "--port", "0", "--threads", "1",
            "--max-active", str(max_active), "--initial-peers", *bench.swarm.initial_peers]  # fmt: skip
    proc = bench.swarm.start_processes({"api": argv})[0]
    port = proc.info["port"]
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10):
                return port
        except OSError:  # 503 (HTTPError is an OSError) until every expert has a replica
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway's swarm never covered every expert") from None
            time.sleep(0.2)


def run_api_bench(args: argparse.Namespace) -> dict:
    from coordinator.models.tiny import VOCAB

    sizes = {"hidden_size": args.hidden, "intermediate_size": args.ffn, "num_hidden_layers": args.layers}
    generator = torch.Generator().manual_seed(INPUT_SEED)
    prompts = torch.randint(2, VOCAB, (max(args.clients), args.prompt_tokens), generator=generator).tolist()
    rounds = []
    for rtt in args.rtt_ms:
        with tiny_hf_swarm(args.family, rtt_ms=rtt, **sizes) as (bench, info):
            bench.start_peers(expert_slices(info.checkpoint.num_experts, args.peers), "--threads", "1")
            port = _start_gateway(bench, max(args.clients))
            run_round(port, prompts[:1], str(bench.ckpt), 4)  # warm-up: channels, sessions, allocator
            single = None
            for n in args.clients:
                result = {"rtt_ms": rtt, **run_round(port, prompts[:n], str(bench.ckpt), args.max_tokens)}
                single = single or (result["aggregate_tokens_per_s"] if n == 1 else None)
                result["over_one_client"] = result["aggregate_tokens_per_s"] / single if single else None
                rounds.append(result)
    result = {
        "family": args.family,
        "layers": args.layers,
        "hidden": args.hidden,
        "peers": args.peers,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "rounds": rounds,
    }
    return report(result, args.json)
