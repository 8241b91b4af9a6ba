"""What the per-call primitives cost on this machine, warm, in a tight loop: the digests receipts
sign (BLAKE3, against SHA-256), the AEADs a session could use (AES-256-GCM, ChaCha20-Poly1305),
an Ed25519 receipt signature and its check, and one hop from an event loop to a worker thread
and back (what offloading a digest costs).

    python -m coordinator.bench.primitives --sizes 131072 1048576 --json primitives.json

Inside a layer call each step runs with its caches cold, so it costs more than here; these are
the ratios the code's choices rest on (envelope.DIGEST_OFFLOAD_BYTES, BLAKE3, AES-GCM).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import uvloop
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def payload_costs(size: int, repeats: int) -> dict:
    """Microseconds to hash and to seal `size` bytes, and the GB/s that makes."""
    data = os.urandom(size)
    nonce = os.urandom(12)
    aes, chacha = AESGCM(AESGCM.generate_key(256)), ChaCha20Poly1305(ChaCha20Poly1305.generate_key())
    costs = {
        "sha256_us": _median_us(lambda: hashlib.sha256(data).digest(), repeats),
        "blake3_us": _median_us(lambda: blake3.blake3(data).digest(), repeats),
        "aes_256_gcm_seal_us": _median_us(lambda: aes.encrypt(nonce, data, b"header"), repeats),
        "chacha20_poly1305_seal_us": _median_us(lambda: chacha.encrypt(nonce, data, b"header"), repeats),
    }
    out: dict = {"bytes": size, **{k: round(v, 1) for k, v in costs.items()}}
    out.update({k.replace("_us", "_gb_per_s"): round(size / v / 1e3, 2) for k, v in costs.items()})
    out["blake3_over_sha256"] = round(costs["sha256_us"] / costs["blake3_us"], 2)
    out["aes_gcm_over_chacha20"] = round(costs["chacha20_poly1305_seal_us"] / costs["aes_256_gcm_seal_us"], 2)
    return out


def signature_costs(repeats: int) -> dict:
    """Microseconds to sign a receipt-sized statement with Ed25519 and to verify it."""
    key = Ed25519PrivateKey.generate()
    public, statement = key.public_key(), os.urandom(96)
    signature = key.sign(statement)
    return {
        "ed25519_sign_us": round(_median_us(lambda: key.sign(statement), repeats), 1),
        "ed25519_verify_us": round(_median_us(lambda: public.verify(signature, statement), repeats), 1),
    }


def thread_hop_us(repeats: int) -> float:
    """Microseconds from an event loop (uvloop, as peer and coordinator run) to a worker thread
    running nothing and back: the least an offloaded digest pays on top of the hash."""

    async def hops() -> float:
        loop = asyncio.get_running_loop()
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            await loop.run_in_executor(None, int)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:]) * 1e6

    return round(uvloop.run(hops()), 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coordinator.bench.primitives", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128 << 10, 1 << 20], help="payload bytes")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--json", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    result = {
        "payloads": [payload_costs(size, args.repeats) for size in args.sizes],
        **signature_costs(args.repeats),
        "thread_hop_us": thread_hop_us(args.repeats),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
