"""The expert-backend interface: what the servicer, the batcher, selfbench and placement use
of the experts a peer hosts, whatever computes them (toy.py, hf.py, or faults.py around either).

Backends subclass `ExpertBackend` explicitly, so they inherit the default of `settle`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch


class ExpertBackend(Protocol):
    kind: str  # the expert architecture announced in Info ("swiglu", or the HF model_type)
    model_id: str
    hidden_dim: int
    ffn_dim: int
    dtype: torch.dtype
    device: torch.device
    slots: dict[str, tuple[int, int]]  # uid -> (layer, slot in that layer's stack)
    uids: list[str]  # the hosted experts, in slot order

    def forward(self, x: torch.Tensor, segments: list[tuple[str, int]]) -> torch.Tensor:
        """x: [sum(rows), H]; each (uid, rows) segment's rows go through its expert; row order is
        kept; the output is on the CPU. Runs on the compute thread, one merged batch at a time."""
        ...

    def measure_throughput(self, rows: int = 128, repeats: int = 3) -> float:
        """Tokens/s of one hosted expert on this device: announced so clients can weigh load."""
        ...

    async def settle(self, compute_ms: float) -> None:
        """Awaited for each request once its batch is computed (in `compute_ms`), before the answer
        leaves; raising peer.service.errors.RequestError refuses it. A real device answers at once."""
        return None


@torch.inference_mode()
def time_throughput(step: Callable[[], object], rows: int, repeats: int, device: torch.device) -> float:
    """Rows/s of `step` (one warm-up call, then `repeats` timed ones, synchronising CUDA)."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return rows * repeats / max(time.perf_counter() - start, 1e-9)
