"""`python -m protos.weights`: download one side's share of a Hub checkpoint, or (--dry-run) show it."""

from __future__ import annotations

import argparse
import sys

from protos.expert_spec import parse_expert_spec
from protos.hf_checkpoint import CheckpointError
from protos.weights import COORDINATOR, PEER, HubCheckpoint, WeightsError, describe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m protos.weights", description=__doc__)
    p.add_argument("--model", required=True, help="Hub repo id, org/name")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main); pinned to a commit")
    p.add_argument("--side", choices=[COORDINATOR, PEER], default=COORDINATOR)
    p.add_argument("--experts", default=None, help="a peer's experts, in moe-peer's --experts grammar (e.g. '*:0-3')")
    p.add_argument("--cache-dir", default=None, help="default: huggingface_hub's cache (HF_HUB_CACHE)")
    p.add_argument("--dry-run", action="store_true", help="print what this side would fetch; fetch no tensor byte")
    p.add_argument("--spans", action="store_true", help="with --dry-run: list every byte span")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        hub = HubCheckpoint(args.model, args.revision, args.cache_dir)
        pairs = None
        if args.side == PEER:
            if not args.experts:
                raise WeightsError("--side peer needs --experts")
            ckpt = hub.checkpoint
            pairs = [
                p for p in parse_expert_spec(args.experts, max(ckpt.layers) + 1, ckpt.num_experts) if p in ckpt.experts
            ]
        if args.dry_run:
            print(describe(hub.plan(args.side, pairs), spans=args.spans))
            return 0
        hub.fetch(args.side, pairs)
        print(hub.folder)
        return 0
    except (WeightsError, CheckpointError, ValueError) as e:
        print(f"moe-swarm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
