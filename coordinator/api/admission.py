"""Who runs: at most `max_active` sequences whose KV reservations fit `kv_tokens`, a bounded
FIFO queue behind them (full: 429 at once), admission in arrival order."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from coordinator.api.errors import ApiError
from coordinator.api.sequence import Sequence


@dataclass(frozen=True)
class Limits:
    max_active: int = 16  # sequences in the running batch
    max_queue: int = 64  # requests waiting behind it
    kv_tokens: int = 65536  # KV cache positions all active sequences may reserve (prompt + max_tokens each)
    prefill_chunk: int = 512  # prompt tokens fed per step, all prefilling sequences together
    retry_after: float = 1.0  # seconds a refused client is told to wait

    def __post_init__(self) -> None:
        for name in ("max_active", "kv_tokens", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")


class Admission:
    """Not thread-safe: the engine calls it under its lock."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.queue: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.reserved = 0

    def offer(self, seq: Sequence) -> None:
        """Queue `seq`, or refuse it: 400 if it could never fit, 429 while the queue is full."""
        if seq.reserved_tokens > self.limits.kv_tokens:
            raise ApiError(
                400,
                f"the prompt and max_tokens need {seq.reserved_tokens} KV cache positions; this gateway allows "
                f"{self.limits.kv_tokens} in all: shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if len(self.queue) >= self.limits.max_queue and not self._fits(seq):
            raise ApiError(
                429,
                f"the gateway is full ({len(self.active)} running, {len(self.queue)} waiting): retry later",
                code="rate_limit_exceeded",
                retry_after=self.limits.retry_after,
            )
        self.queue.append(seq)

    def _fits(self, seq: Sequence) -> bool:
        """Would `seq` run now, ahead of nobody?"""
        return not self.queue and self._room_for(seq)

    def _room_for(self, seq: Sequence) -> bool:
        limits = self.limits
        return len(self.active) < limits.max_active and self.reserved + seq.reserved_tokens <= limits.kv_tokens

    def admit(self) -> list[Sequence]:
        """Move queued sequences into the batch while they fit, in arrival order (no overtaking)."""
        admitted = []
        while self.queue:
            head = self.queue[0]
            if head.cancelled:
                self.queue.popleft()
                continue
            if not self._room_for(head):
                break
            self.queue.popleft()
            self.active.append(head)
            self.reserved += head.reserved_tokens
            admitted.append(head)
        return admitted

    def release(self, seq: Sequence) -> None:
        self.active.remove(seq)
        self.reserved -= seq.reserved_tokens

    def drop_cancelled(self) -> list[Sequence]:
        """Cancelled sequences leave the queue and the batch (their slots free at once)."""
        gone = [s for s in self.active if s.cancelled]
        for s in gone:
            self.release(s)
        self.queue = deque(s for s in self.queue if not s.cancelled)
        return gone

    @property
    def idle(self) -> bool:
        return not self.active and not self.queue
