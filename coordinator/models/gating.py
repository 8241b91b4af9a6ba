"""Routing rules: router logits -> (weights, expert indices) per token."""

from __future__ import annotations

import torch


def topk_softmax(logits: torch.Tensor, k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's rule: softmax over all experts in fp32, keep the top k, renormalise them.

    Returns weights [T, k] (fp32) and expert indices [T, k] (int64), best first.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def combine(expert_out: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """expert_out [T, k, H] and weights [T, k] -> [T, H]; summed slot by slot in a fixed order."""
    return (expert_out.float() * weights.unsqueeze(-1)).sum(dim=1).to(dtype)


def renormalize_answered(weights: torch.Tensor, answered: torch.Tensor) -> torch.Tensor:
    """Drop fallback: zero the weights of unanswered slots and rescale the rest to the
    original total, per token (a token with no answered slot contributes nothing)."""
    kept = weights * answered
    total, kept_total = weights.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
    return torch.where(kept_total > 0, kept * (total / kept_total.clamp_min(torch.finfo(kept.dtype).tiny)), 0)
