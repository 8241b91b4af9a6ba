"""RemoteMoE: one MoE layer whose router runs here and whose experts run in the swarm."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from coordinator.dispatch.dispatcher import DispatchResult, ScoresFn
from coordinator.models.gating import combine, renormalize_answered, topk_softmax
from protos.records import expert_uid


class ExpertExecutor(Protocol):
    def dispatch(
        self,
        x: torch.Tensor,
        experts: torch.Tensor,
        uids: list[str],
        dtype: torch.dtype,
        scores: ScoresFn = None,
    ) -> DispatchResult: ...


class RemoteMoE(nn.Module):
    """gate -> top-k softmax -> swarm dispatch -> weighted combine, in the input's token order."""

    def __init__(
        self, gate_weight: torch.Tensor, *, model_id: str, layer: int, top_k: int, executor: ExpertExecutor
    ) -> None:
        super().__init__()
        num_experts, hidden = gate_weight.shape
        self.gate = nn.Linear(hidden, num_experts, bias=False, dtype=gate_weight.dtype)
        with torch.no_grad():
            self.gate.weight.copy_(gate_weight)
        self.top_k = top_k
        self.layer = layer
        self.uids = [expert_uid(model_id, layer, e) for e in range(num_experts)]
        self.executor = executor

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        logits = self.gate(x)
        weights, experts = topk_softmax(logits, self.top_k)
        result = self.executor.dispatch(x, experts, self.uids, hidden.dtype, scores=lambda: logits)
        if not result.complete:  # dropped slots: renormalise over the experts that answered
            weights = renormalize_answered(weights, result.answered)
        return combine(result.outputs, weights, hidden.dtype).view(shape)
