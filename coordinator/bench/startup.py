"""A peer's start-up, launch to serving, by phase: medians over restarts of the same peer
(warm: the files, the byte-code and the throughput cache are hot after the first start, which
is left out), for a toy checkpoint and a tiny Hugging Face one.

    python -m coordinator.bench.startup --starts 5

Phases are what the peer reports in its ready file (peer/startup.py): imports (interpreter
and modules), experts (reading them; for Hugging Face checkpoints also importing the
family's transformers module), dht (what joining the swarm adds once the experts are
loaded: the node starts while they load), throughput, server, online (reachability check
and first announcement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from coordinator.models.tiny import save_tiny_checkpoint
from coordinator.sim.local_swarm import LocalSwarm
from protos import toy_model
from protos.toy_model import ToyConfig


def checkpoints(root: Path) -> dict[str, list[str]]:
    toy_model.save_checkpoint(root / "toy", ToyConfig(), 0)
    hf = save_tiny_checkpoint(root / "mixtral", "mixtral", seed=0)
    return {"toy": ["--checkpoint", str(root / "toy")], "hf-mixtral": ["--model", str(hf)]}


def measure(swarm: LocalSwarm, args: list[str], starts: int) -> dict[str, float]:
    """Median seconds per phase over `starts` warm starts, and the launch-to-ready time seen outside."""
    runs: list[dict[str, float]] = []
    for i in range(starts + 1):
        begun = time.monotonic()
        proc = swarm.start_peer(f"p{len(swarm.processes)}", *args, "--threads", "1")
        outside = time.monotonic() - begun
        swarm.stop(proc)
        if i:  # the first start fills the caches
            runs.append({**proc.info["startup_s"], "launch_to_ready": outside})
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m coordinator.bench.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5, help="warm starts per checkpoint (the median is reported)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.starts < 1:
        raise SystemExit("--starts must be at least 1")
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(tmp) / "swarm") as swarm:
        swarm.start_bootstrap()
        results = {name: measure(swarm, peer_args, args.starts) for name, peer_args in checkpoints(Path(tmp)).items()}
    for name, phases in results.items():
        print(f"{name:12s} " + "  ".join(f"{k} {v:.2f}s" for k, v in phases.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
