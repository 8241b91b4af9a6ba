"""One coordinator process of the overload test: many layer calls at once against the swarm,
checked against the in-process reference; prints its counters as JSON.

python -m tests.storm_client CKPT SEED CALLS START_AT INITIAL_PEER...

START_AT (unix time) lines up the storms of several processes that start at different speeds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import torch

from coordinator.client import SwarmClient
from coordinator.models.gating import combine, topk_softmax
from coordinator.models.toy_stack import LocalExperts, ToyMoEStack
from protos import toy_model


def main(ckpt: Path, seed: int, calls: int, start_at: float, initial_peers: list[str]) -> dict:
    torch.set_num_threads(1)
    manifest = toy_model.read_manifest(ckpt)
    x = torch.randn(16, manifest.config.hidden_dim, generator=torch.Generator().manual_seed(seed))
    reference = ToyMoEStack.from_checkpoint(ckpt, LocalExperts.from_checkpoint(ckpt)).layers[0]
    with SwarmClient(initial_peers, manifest.uids(), timeout=20, hedge=False) as client, torch.inference_mode():
        client.wait_for_experts(timeout=60)
        layer = ToyMoEStack.from_checkpoint(ckpt, client).layers[0]
        want = reference(x)
        weights, experts = topk_softmax(layer.gate(x), manifest.config.top_k)
        time.sleep(max(0.0, start_at - time.time()))

        async def storm():
            return await asyncio.gather(
                *(client.dispatcher.dispatch(x, experts, layer.uids, x.dtype) for _ in range(calls)),
                return_exceptions=True,
            )

        results = client.io.run(storm())
        stats = client.dispatcher.stats
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    done = [r for r in results if not isinstance(r, BaseException)]
    return {
        "errors": errors,
        "complete": all(r.complete for r in done),
        "max_error": max((combine(r.outputs, weights, x.dtype) - want).abs().max().item() for r in done),
        "refusals": stats.refusals,
        "bans": stats.bans,
        "rpcs_by_peer": dict(stats.rpcs_by_peer),
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5:])))
