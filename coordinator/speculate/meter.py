"""What each verify pass touches: a wrapper around a swarm model's expert executor that
counts the experts a pass routes to, and that can skip them (the trunk draft)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from coordinator.dispatch.result import DispatchResult


class MeteredExecutor:
    """Stands for the ExpertExecutor of every RemoteExperts of one model (see `meter_model`)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.skipping = False
        self.experts: set[tuple[str, int]] = set()  # (layer's first uid, expert) touched since the last reset
        self.layer_calls = 0

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor, uids: list[str], dtype: torch.dtype, scores=None):
        if self.skipping:  # the routed experts contribute nothing; the weights then multiply zeros
            k = experts.shape[1]
            return DispatchResult(
                torch.zeros(x.shape[0], k, x.shape[-1], dtype=dtype),
                torch.ones(x.shape[0], k, dtype=torch.bool),
                experts,
            )
        self.layer_calls += 1
        layer = uids[0] if uids else ""
        self.experts.update((layer, e) for e in torch.unique(experts).tolist())
        return self.inner.dispatch(x, experts, uids, dtype, scores)

    @contextlib.contextmanager
    def skip(self) -> Iterator[None]:
        saved, self.skipping = self.skipping, True
        try:
            yield
        finally:
            self.skipping = saved

    @property
    def stats(self) -> Any:
        """The dispatcher's stats when the inner executor is a SwarmClient (None otherwise)."""
        dispatcher = getattr(self.inner, "dispatcher", None)
        return getattr(dispatcher, "stats", None)

    def snapshot(self) -> tuple[int, Counter[str], int]:
        """(layer calls, RPCs by peer, RPCs) so far, to diff a pass against."""
        stats = self.stats
        if stats is None:
            return self.layer_calls, Counter(), 0
        return self.layer_calls, Counter(stats.rpcs_by_peer), stats.rpcs


def meter_model(model: nn.Module) -> MeteredExecutor:
    """Wrap the executor of `model`'s remote experts modules once; the same meter afterwards."""
    from coordinator.models.hf import RemoteExperts

    meter = getattr(model, "_moe_swarm_meter", None)
    if meter is not None:
        return meter
    modules = [m for m in model.modules() if isinstance(m, RemoteExperts)]
    if not modules:
        raise ValueError("speculative decoding through the swarm needs a model from load_swarm_model")
    inner = modules[0].executor
    meter = MeteredExecutor(inner)
    for m in modules:
        m.executor = meter
    object.__setattr__(model, "_moe_swarm_meter", meter)
    return meter
