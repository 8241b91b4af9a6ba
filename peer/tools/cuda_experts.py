"""Expert compute on one device: rows/s of `HostedExperts.forward` (the peer's whole compute
step, host->device copy and answer back to host included) for growing batches, with the
grouped GEMM the peer uses and with one GEMM per expert, side by side in one run, and the
grouped math alone with input and output on the device (`device_only_ms`).

    python -m peer.tools.cuda_experts --hidden 4096 --ffn 14336 --experts 8 --k 2 --json out.json

Runs on CPU too (`--device cpu`), but it exists for GPU peers: the numbers a volunteer's card gives.
It measures the peer's own compute step in this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from protos.records import expert_uid
from protos.toy_model import ToyConfig

if TYPE_CHECKING:
    from peer.backends.toy import HostedExperts


def _segments(hosted: HostedExperts, tokens: int, experts: int, k: int, gen: torch.Generator) -> list[tuple[str, int]]:
    """Top-k routing of `tokens`, uniform over experts: (uid, rows) in expert order."""
    picks = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]).flatten()
    counts = torch.bincount(picks, minlength=experts).tolist()
    return [(expert_uid(hosted.model_id, 0, e), n) for e, n in enumerate(counts) if n]


def _time(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `step` (each call synchronised: the peer answers only once it is done)."""
    step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peer.tools.cuda_experts", description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 2048], help="tokens per request")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    return p


def _measure(hosted: HostedExperts, x: torch.Tensor, segments: list[tuple[str, int]], args: argparse.Namespace) -> dict:
    """ms, rows/s and TFLOP/s of the peer's compute step (grouped GEMM and one GEMM per expert),
    and ms of the grouped math alone with input and output left on the device."""
    device = torch.device(args.device)
    layer = hosted.layers[0]
    grouped = layer.grouped
    flops_per_row = 2 * 3 * args.hidden * args.ffn
    entry = {}
    for name, use_grouped in (("grouped", True), ("per_expert", False)):
        if use_grouped and not grouped:
            continue
        layer.grouped = use_grouped
        seconds = _time(lambda: hosted.forward(x, segments), device, args.repeats)
        entry[name] = {
            "ms": seconds * 1e3,
            "rows_per_s": x.shape[0] / seconds,
            "tflops": flops_per_row * x.shape[0] / seconds / 1e12,
        }
    layer.grouped = grouped
    # the same math with the input already on the device and the output left there:
    # what the host<->device copies add to a request of this size
    rows_per_slot = [0] * args.experts
    for uid, n in segments:
        rows_per_slot[hosted.slots[uid][1]] = n
    on_device = x.to(device)
    entry["device_only_ms"] = _time(lambda: layer.many(on_device, rows_per_slot), device, args.repeats) * 1e3
    return entry


def main(argv: list[str] | None = None) -> None:
    from peer.backends.toy import HostedExperts

    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    cfg = ToyConfig(num_layers=1, num_experts=args.experts, hidden_dim=args.hidden, ffn_dim=args.ffn, dtype=args.dtype)
    hosted = HostedExperts.from_seed(cfg, 0, "*", device)
    gen = torch.Generator().manual_seed(0)
    result: dict = {"device": str(device), "dtype": args.dtype, "hidden": args.hidden, "ffn": args.ffn}
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
    result["torch"] = torch.__version__
    for tokens in args.tokens:
        segments = _segments(hosted, tokens, args.experts, args.k, gen)
        x = torch.randn(sum(n for _, n in segments), args.hidden, generator=gen).to(cfg.torch_dtype)
        entry = _measure(hosted, x, segments, args)
        result[f"{tokens}_tokens"] = entry
        print(tokens, "tokens", json.dumps(entry), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
