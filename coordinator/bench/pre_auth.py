"""What a caller's unauthenticated work costs a real peer, side by side with an honest call in
one run: a Forward flooded with one-row segments (refused by the segment-count bound, or by
the receive limit when larger), a fresh hello (signature + key exchange) and a replayed one
(refused before any crypto).

    python -m coordinator.bench.pre_auth --segments 140000 1000000

Medians of client-side round trips on 127.0.0.1 (the peer: toy experts, hidden 64, fp32,
--max-rows 4096, so its receive limit is ~1.06 MiB).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import torch

from coordinator.dispatch import sealed
from coordinator.sim.local_swarm import LocalSwarm
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos import toy_model
from protos.envelope import Identity
from protos.limits import grpc_options
from protos.toy_model import ToyConfig

CONFIG = ToyConfig(num_layers=1, num_experts=4, hidden_dim=64, ffn_dim=128, top_k=2)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _refused(call: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            call()
        except grpc.RpcError:
            return
        raise AssertionError("the peer served an attack request")

    return run


def measure(stub: pb_grpc.ExpertServiceStub, channel: grpc.Channel, uid: str, segments: list[int]) -> dict:
    kx = stub.Info(pb.InfoRequest(), timeout=10).kx_public
    me = Identity.generate()
    hello, keys = sealed.hello(me, kx)
    stub.OpenSession(hello, timeout=10)
    counter = iter(range(1, 1 << 30))

    def honest() -> None:
        sent = sealed.build_request([(uid, 4)], torch.ones(4, CONFIG.hidden_dim), 10.0, keys, next(counter))
        stub.Forward(sent.request, timeout=10)

    out = {"honest_forward_ms": round(_median_ms(honest, 50), 2)}
    raw = channel.unary_unary("/moe_swarm.v1.ExpertService/Forward", request_serializer=None)
    for n in segments:
        flood = pb.ForwardRequest(segments=[pb.Segment(expert_uid="x", num_rows=1)] * n, session_id=keys.session_id)
        body = flood.SerializeToString()  # once: the client's own serializing is not the peer's cost
        out[f"segments_{n}_refused_ms"] = round(_median_ms(_refused(lambda b=body: raw(b, timeout=30)), 10), 2)
    fresh = iter([sealed.hello(me, kx)[0] for _ in range(40)])
    out["fresh_hello_ms"] = round(_median_ms(lambda: stub.OpenSession(next(fresh), timeout=10), 40), 2)
    out["replayed_hello_refused_ms"] = round(_median_ms(_refused(lambda: stub.OpenSession(hello, timeout=10)), 40), 2)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m coordinator.bench.pre_auth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, nargs="+", default=[140000, 1000000], help="segment counts to send")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pre-auth-") as tmp, LocalSwarm(Path(tmp) / "swarm") as swarm:
        ckpt = Path(tmp) / "ckpt"
        toy_model.save_checkpoint(ckpt, CONFIG, seed=1)
        swarm.start_bootstrap()
        peer = swarm.start_peer("peer", "--checkpoint", str(ckpt), "--threads", "1", "--max-rows", "4096")
        with grpc.insecure_channel(peer.info["endpoint"], options=grpc_options(64 << 20)) as channel:
            result = measure(pb_grpc.ExpertServiceStub(channel), channel, peer.info["experts"][0], args.segments)
    for key, value in result.items():
        print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()
