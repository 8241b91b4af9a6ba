"""A coordinator run inside a test's network namespace (tests/netns.py): greedy generation of a
local checkpoint through the swarm, its tokens, logits and dispatch counts written as JSON.

    python -m tests.netns_generate CKPT OUT --initial-peers MADDR... [--tokens N]
        [--pause-at K --pause-file P --resume-file R] [--plaintext] [--timeout S]

With --pause-at it generates K tokens, writes the pause file (the relayed connections in use,
as JSON), waits for the resume file (the test changes the network meanwhile, e.g. kills the
relay in use), then generates the rest.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from coordinator.client import SwarmClient
from coordinator.models.hf import checkpoint_info, load_swarm_model
from coordinator.models.tiny import VOCAB

PROMPT = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))


def _generate(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))


def relayed_via(client: SwarmClient) -> list[str]:
    """The addresses the coordinator's libp2p node is connected to relayed peers at."""
    link = client.channels.link
    reaches = {r.record.reach for rs in client.swarm.snapshot().values() for r in rs if r.record.reach is not None}
    if link is None:
        return []
    return sorted(a for reach in reaches for a in client.io.run(link.connections(reach)))


def probe(client: SwarmClient, uids: list[str], out: Path) -> None:
    """Known rows, the first half to expert 0 (the direct peer), the rest to expert 4 (the home
    peer), several times; the rows' bytes (a capture is searched for them) and whether every
    answer came back."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(11))
    experts = torch.tensor([[0]] * 8 + [[4]] * 8)
    answered = all(bool(client.dispatch(x, experts, uids[:8], torch.float32).answered.all()) for _ in range(3))
    rows = [row.numpy().tobytes().hex() for row in x]
    out.write_text(json.dumps({"rows": rows, "answered": answered}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--initial-peers", nargs="+", required=True)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--pause-at", type=int, default=0)
    p.add_argument("--pause-file", type=Path)
    p.add_argument("--resume-file", type=Path)
    p.add_argument("--plaintext", action="store_true", help="unsealed requests (peers run --allow-plaintext)")
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--fallback", default="reroute")
    p.add_argument("--probe", action="store_true", help="instead: send known rows to expert 0 and 4 of layer 0")
    args = p.parse_args()
    torch.set_num_threads(1)
    info = checkpoint_info(args.ckpt)
    with SwarmClient(
        args.initial_peers,
        info.uids,
        timeout=args.timeout,
        secure=not args.plaintext,
        refresh_period=1.0,
        fallback=args.fallback,
    ) as client:
        client.wait_for_experts(timeout=60)
        if args.probe:
            return probe(client, info.uids, args.out)
        model = load_swarm_model(args.ckpt, client, info=info)
        with torch.inference_mode():
            logits = model(PROMPT).logits
        ids = PROMPT
        if args.pause_at:
            ids = _generate(model, ids, args.pause_at)
            exact_before = client.dispatcher.stats.exact
            via_before = relayed_via(client)
            args.pause_file.write_text(json.dumps(via_before))  # the test may cut the relay in use
            while not args.resume_file.exists():
                time.sleep(0.05)
        ids = _generate(model, ids, args.tokens - args.pause_at)
        stats = client.dispatcher.stats
        result = {
            "tokens": ids[0].tolist(),
            "logits": logits.flatten().tolist(),
            "routed": stats.routed,
            "exact": stats.exact,
            "rerouted": stats.rerouted,
            "dropped": stats.dropped,
            "exact_before_pause": exact_before if args.pause_at else None,
            "via_before_pause": via_before if args.pause_at else None,
            "via": relayed_via(client),
            "rpcs": stats.rpcs,
            "relay_streams": client.channels.link.streams_opened if client.channels.link else 0,
        }
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
