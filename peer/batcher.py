"""Continuous micro-batching on the peer's device.

While the device computes one batch, new requests queue; when it is free, everything
queued (up to `max_batch_rows`) is merged into one batch: each expert's rows from all
requests become one GEMM, so under load the device sees full batches, and an idle peer
adds no waiting at all (`max_wait_ms` > 0 trades latency for fuller batches). Requests
whose caller went away or whose deadline passed are dropped before compute.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from .backends.base import ExpertBackend

# A CPU batch expected (from the measured CPU ms per row) to compute within this runs on the
# event loop's own thread. Handing it to the compute thread and back costs two thread wake-ups:
# 0.2-0.35 ms on a busy 2-core host, more than a decode step's GEMMs, and the compute thread,
# woken rarely, runs them colder than the loop does. Bigger batches (what load brings) leave the
# loop free for the other requests' reads and writes.
INLINE_MAX_MS = 0.5


class DeadlineMissed(Exception):
    pass


@dataclass
class Job:
    x: torch.Tensor
    segments: list[tuple[str, int]]
    deadline: float | None  # time.monotonic() by which the answer is useless
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        return self.x.shape[0]


def merged_forward(
    experts: ExpertBackend, items: Sequence[tuple[torch.Tensor, list[tuple[str, int]]]]
) -> list[torch.Tensor]:
    """Compute several requests as one batch; outputs are split back per request, in order."""
    if len(items) == 1:
        return [experts.forward(*items[0])]
    pieces = []  # ((layer, slot), request, start row, rows, uid)
    for i, (_, segments) in enumerate(items):
        start = 0
        for uid, rows in segments:
            pieces.append((experts.slots[uid], i, start, rows, uid))
            start += rows
    pieces.sort(key=lambda p: p[0])  # stable: within an expert, requests keep their order
    x = torch.cat([items[i][0][s : s + n] for _, i, s, n, _ in pieces])
    segments: list[tuple[str, int]] = []
    for *_, rows, uid in pieces:
        if segments and segments[-1][0] == uid:
            segments[-1] = (uid, segments[-1][1] + rows)
        else:
            segments.append((uid, rows))
    out = experts.forward(x, segments)
    outs = [torch.empty_like(item[0]) for item in items]
    offset = 0
    for _, i, s, n, _ in pieces:
        outs[i][s : s + n] = out[offset : offset + n]
        offset += n
    return outs


def _timed_forward(experts: ExpertBackend, items: Sequence[tuple[torch.Tensor, list]]) -> tuple[list, float]:
    """merged_forward and the CPU time its thread spent on it (ms). CPU time, not wall time:
    on a busy host a thread waits for the GIL and for a core, and that wait is not what
    running the batch on the event loop's thread would cost."""
    started = time.thread_time()
    outs = merged_forward(experts, items)
    return outs, (time.thread_time() - started) * 1e3


class MicroBatcher:
    def __init__(
        self, experts: ExpertBackend, executor: Executor, max_batch_rows: int = 4096, max_wait_ms: float = 0.0
    ) -> None:
        self.experts = experts
        self.executor = executor
        self.max_batch_rows = max_batch_rows
        self.max_wait = max_wait_ms / 1e3
        self.batches = 0
        self.batched_requests = 0
        self.on_batch: Callable[[int, int, float], None] | None = None  # (rows, requests, compute ms): metrics
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task | None = None
        self._busy = False  # a batch is being computed (its requests left the queue)
        self._ms_per_row: float | None = None  # measured, for the inline decision

    async def submit(
        self, x: torch.Tensor, segments: list[tuple[str, int]], deadline: float | None
    ) -> tuple[torch.Tensor, float, float]:
        """(output, ms queued, ms computing the batch it joined)."""
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        job = Job(x, segments, deadline, asyncio.get_running_loop().create_future())
        if not self._busy and not self.max_wait and self._queue.empty() and self._inline(job.rows):
            # an idle device and a batch of one that runs inline anyway: no trip through the queue
            self._compute_inline([job])
        else:
            await self._queue.put(job)
        return await job.future

    async def _next_batch(self) -> list[Job]:
        batch = [await self._queue.get()]
        rows = batch[0].rows
        give_up = time.perf_counter() + self.max_wait
        while rows < self.max_batch_rows:
            if self._queue.empty():
                remaining = give_up - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                job = self._queue.get_nowait()
            if rows + job.rows > self.max_batch_rows:
                await self._queue.put(job)  # goes first into the next batch (queue order kept otherwise)
                break
            batch.append(job)
            rows += job.rows
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            now = time.monotonic()
            live = []
            for job in batch:
                if job.future.done():  # cancelled: the caller went away
                    continue
                if job.deadline is not None and now >= job.deadline:
                    job.future.set_exception(DeadlineMissed("deadline passed while queued"))
                    continue
                live.append(job)
            if not live:
                continue
            if self._inline(sum(j.rows for j in live)):  # a decode step's few rows: a thread hop costs more
                self._compute_inline(live)
                continue
            self._busy = True
            started, items = time.perf_counter(), self._items(live)
            try:
                outs, cpu_ms = await loop.run_in_executor(self.executor, _timed_forward, self.experts, items)
            except Exception as e:  # the batch failed: every request in it gets the error
                self._fail(live, e)
                continue
            finally:
                self._busy = False
            self._answer(live, outs, cpu_ms, started)

    def _compute_inline(self, live: list[Job]) -> None:
        started = time.perf_counter()
        try:
            outs, cpu_ms = _timed_forward(self.experts, self._items(live))
        except Exception as e:
            self._fail(live, e)
            return
        self._answer(live, outs, cpu_ms, started)

    @staticmethod
    def _items(live: list[Job]) -> list[tuple[torch.Tensor, list[tuple[str, int]]]]:
        return [(j.x, j.segments) for j in live]

    @staticmethod
    def _fail(live: list[Job], error: Exception) -> None:
        for job in live:
            if not job.future.done():
                job.future.set_exception(error)

    def _answer(self, live: list[Job], outs: list[torch.Tensor], cpu_ms: float, started: float) -> None:
        compute_ms = (time.perf_counter() - started) * 1e3
        rows = sum(j.rows for j in live)
        self._learn(rows, cpu_ms)
        self.batches += 1
        self.batched_requests += len(live)
        if self.on_batch is not None:
            self.on_batch(rows, len(live), compute_ms)
        for job, out in zip(live, outs, strict=True):
            if not job.future.done():
                job.future.set_result((out, (started - job.enqueued) * 1e3, compute_ms))

    def _inline(self, rows: int) -> bool:
        """Compute on the event loop's thread: a CPU batch expected to take under INLINE_MAX_MS."""
        device = getattr(self.experts, "device", None)
        if device is None or device.type != "cpu" or self._ms_per_row is None:
            return False
        return rows * self._ms_per_row <= INLINE_MAX_MS

    def _learn(self, rows: int, compute_ms: float) -> None:
        per_row = compute_ms / max(rows, 1)
        old = self._ms_per_row
        self._ms_per_row = per_row if old is None else 0.9 * old + 0.1 * per_row

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
