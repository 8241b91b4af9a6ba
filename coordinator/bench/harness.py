"""The setup every benchmark shares: a local swarm of peer processes over a seeded checkpoint
(a toy one, or a tiny Hugging Face one), the client, and the in-process reference.

Weights come from seed 0 and inputs from seed 1, so every run of a benchmark computes the
same thing and only the timings differ.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from coordinator.client import SwarmClient
from coordinator.models.toy_stack import LocalExperts, ToyMoEStack
from coordinator.sim.local_swarm import LocalSwarm, Process
from protos import toy_model
from protos.toy_model import ToyConfig

if TYPE_CHECKING:
    from coordinator.models.hf import SwarmModelInfo

WEIGHTS_SEED = 0
INPUT_SEED = 1


def hivemind_matched_ffn(hidden: int) -> int:
    """The SwiGLU FFN size with the FLOPs of hivemind's ffn expert: that one is H->4H->H (8H^2
    MACs), SwiGLU has three H x F matrices, so F = 8H/3 (a multiple of 8)."""
    return max(8, round(8 * hidden / 3 / 8) * 8)


def layer_input(tokens: int, hidden: int) -> torch.Tensor:
    """The hidden states one layer call gets: the same in every run."""
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(INPUT_SEED))


@dataclass
class BenchSwarm:
    """A local swarm and the checkpoint its peers serve."""

    swarm: LocalSwarm
    ckpt: Path
    uids: list[str]
    model_flag: str  # how `moe-peer serve` is given this checkpoint: --checkpoint (toy) or --model (HF)

    def start_peer(self, *peer_args: str) -> Process:
        """One peer, `peer0`, hosting every expert."""
        return self.swarm.start_peer("peer0", self.model_flag, str(self.ckpt), "--experts", "*", *peer_args)

    def start_peers(self, expert_specs: list[str], *peer_args: str) -> list[Process]:
        """One peer per --experts spec (`peer0`, `peer1`, ...), started together."""
        return self.swarm.start_peers(
            {
                f"peer{i}": [self.model_flag, str(self.ckpt), "--experts", spec, *peer_args]
                for i, spec in enumerate(expert_specs)
            }
        )

    def client(self, **options: Any) -> SwarmClient:
        # a slow refresh keeps DHT traffic out of the timed calls
        return SwarmClient(self.swarm.initial_peers, self.uids, refresh_period=60, **options)


@contextlib.contextmanager
def toy_swarm(
    config: ToyConfig, start_timeout: float = 90.0, bootstrap: bool = True, rtt_ms: float = 0.0
) -> Iterator[BenchSwarm]:
    """A temporary directory with a seeded toy checkpoint and a local swarm (its bootstrap node
    up unless `bootstrap` is False); no peers yet. `rtt_ms`: each peer's round-trip time (LocalSwarm)."""
    with (
        tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp,
        LocalSwarm(Path(tmp) / "swarm", start_timeout, rtt_ms=rtt_ms) as swarm,
    ):
        ckpt = Path(tmp) / "ckpt"
        toy_model.save_checkpoint(ckpt, config, seed=WEIGHTS_SEED)
        if bootstrap:
            swarm.start_bootstrap()
        yield BenchSwarm(swarm, ckpt, toy_model.read_manifest(ckpt).uids(), "--checkpoint")


@contextlib.contextmanager
def tiny_hf_swarm(family: str, rtt_ms: float = 0.0, **sizes: int) -> Iterator[tuple[BenchSwarm, SwarmModelInfo]]:
    """A seeded tiny Hugging Face checkpoint of `family` (`sizes`: config overrides such as
    hidden_size) and a local swarm with its bootstrap node up; no peers yet. `rtt_ms`: each
    peer's round-trip time (LocalSwarm)."""
    from coordinator.models.hf import checkpoint_info
    from coordinator.models.tiny import save_tiny_checkpoint

    with (
        tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp,
        LocalSwarm(Path(tmp) / "swarm", rtt_ms=rtt_ms) as swarm,
    ):
        ckpt = save_tiny_checkpoint(Path(tmp) / "ckpt", family, seed=WEIGHTS_SEED, **sizes)
        info = checkpoint_info(ckpt)
        swarm.start_bootstrap()
        yield BenchSwarm(swarm, ckpt, info.uids, "--model"), info


def remote_layer(ckpt: Path, client: SwarmClient) -> nn.Module:
    """The toy checkpoint's first MoE layer with its experts computed by the swarm."""
    return ToyMoEStack.from_checkpoint(ckpt, client).layers[0]


def local_layer(ckpt: Path) -> nn.Module:
    """The same layer with its experts computed in this process: the reference."""
    return ToyMoEStack.from_checkpoint(ckpt, LocalExperts.from_checkpoint(ckpt)).layers[0]


def local_hf_model(ckpt: Path) -> nn.Module:
    """The Hugging Face checkpoint run by transformers in this process: the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="eager").eval()


def report(result: dict, path: Path | None) -> dict:
    """`result`, also written to `path` as JSON when given (--json)."""
    if path:
        path.write_text(json.dumps(result, indent=2))
    return result
