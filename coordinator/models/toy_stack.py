"""The toy MoE layer stack on the coordinator: routers from the checkpoint, experts remote.

`LocalExperts` computes the same experts in-process from the checkpoint: the reference
the demo and benchmarks compare the swarm against.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from coordinator.dispatch.dispatcher import DispatchResult, ScoresFn
from coordinator.models.remote_moe import ExpertExecutor, RemoteMoE
from protos import toy_model
from protos.records import expert_uid
from protos.toy_model import EXPERT_PARAMS, Manifest


class ToyMoEStack(nn.Module):
    """x -> x + moe_l(x) for each layer l."""

    def __init__(self, manifest: Manifest, gates: dict[str, torch.Tensor], executor: ExpertExecutor) -> None:
        super().__init__()
        cfg = manifest.config
        self.manifest = manifest
        self.layers = nn.ModuleList(
            RemoteMoE(
                gates[toy_model.gate_key(i)], model_id=manifest.model_id, layer=i, top_k=cfg.top_k, executor=executor
            )
            for i in range(cfg.num_layers)
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path, executor: ExpertExecutor) -> ToyMoEStack:
        manifest = toy_model.read_manifest(path)
        keys = [toy_model.gate_key(i) for i in range(manifest.config.num_layers)]
        return cls(manifest, toy_model.read_tensors(path, keys), executor)

    @property
    def uids(self) -> list[str]:
        return [uid for layer in self.layers for uid in layer.uids]

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


class LocalExperts:
    """ExpertExecutor that runs every expert in this process (reference / baseline)."""

    def __init__(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.weights = weights

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> LocalExperts:
        manifest = toy_model.read_manifest(path)
        cfg = manifest.config
        pairs = [(layer, e) for layer in range(cfg.num_layers) for e in range(cfg.num_experts)]
        state = toy_model.read_tensors(
            path, [toy_model.expert_key(lay, e, p) for lay, e in pairs for p in EXPERT_PARAMS]
        )
        return cls(
            {
                expert_uid(manifest.model_id, lay, e): tuple(
                    state[toy_model.expert_key(lay, e, p)] for p in EXPERT_PARAMS
                )
                for lay, e in pairs
            }
        )

    @torch.inference_mode()
    def dispatch(
        self, x: torch.Tensor, experts: torch.Tensor, uids: list[str], dtype: torch.dtype, scores: ScoresFn = None
    ) -> DispatchResult:
        num_tokens, k = experts.shape
        out = torch.empty(num_tokens * k, x.shape[-1], dtype=dtype)
        flat = experts.reshape(-1)
        for e in torch.unique(flat).tolist():
            positions = (flat == e).nonzero().squeeze(1)
            out[positions] = toy_model.swiglu_expert(x[positions // k].to(dtype), *self.weights[uids[e]])
        return DispatchResult(out.view(num_tokens, k, -1), torch.ones_like(experts, dtype=torch.bool), experts)
