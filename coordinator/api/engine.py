"""Continuous batching: sequences join and leave the running batch at token boundaries.

Each step feeds every active sequence: one token for those decoding, a chunk of the prompt
for those prefilling (`prefill_chunk` tokens per step in all, so a long prompt never stalls
the others' decode). Every sequence runs its own forward with its own KV cache on a worker
thread, exactly the computation it would run alone; the StepRendezvous merges their expert
calls, so the swarm sees one layer call per MoE layer per step carrying every row.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from coordinator.api.admission import Admission, Limits
from coordinator.api.errors import ApiError
from coordinator.api.metrics import ApiMetrics
from coordinator.api.rendezvous import StepRendezvous
from coordinator.api.sequence import Sequence
from coordinator.dispatch.dispatcher import DispatchError

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: nn.Module, rendezvous: StepRendezvous, limits: Limits, metrics: ApiMetrics) -> None:
        self.model = model
        self.rendezvous = rendezvous
        self.limits = limits
        self.metrics = metrics
        self.admission = Admission(limits)
        self.draining = False
        self._lock = threading.Condition()
        self._stopped = False
        threads = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(
            limits.max_active, "moe-swarm-seq", initializer=lambda: torch.set_num_threads(threads)
        )
        self._thread = threading.Thread(target=self._loop, name="moe-swarm-engine", daemon=True)
        self._thread.start()

    # ---- the server's side (any thread) ------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Queue a sequence (ApiError: 503 while draining, 429 when full, 400 when it can never fit)."""
        with self._lock:
            if self.draining or self._stopped:
                raise ApiError(503, "the gateway is shutting down", retry_after=self.limits.retry_after)
            self.admission.offer(seq)
            self.metrics.queue_depth.set(len(self.admission.queue))
            self._lock.notify_all()

    def cancel(self, seq: Sequence) -> None:
        """The client went away: a queued sequence leaves now, a running one at the next token boundary."""
        with self._lock:
            if not seq.done and not seq.cancelled:
                seq.cancelled = True
                self.metrics.cancelled.inc()
                if seq in self.admission.queue:
                    self.admission.queue.remove(seq)
                    self._gauges()
            self._lock.notify_all()

    def idle(self) -> bool:
        with self._lock:
            return self.admission.idle

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- the engine's thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._has_work():
                    self._lock.wait()
                if self._stopped:
                    return
                batch = self._admit()
            try:
                self._step(batch)
            except Exception:  # a bug must not stop the engine: fail this step's sequences
                log.exception("batch step failed")
                self._fail(batch, ApiError(500, "internal error while generating"))

    def _has_work(self) -> bool:
        a = self.admission
        return bool(a.active) or any(not s.cancelled for s in a.queue) or any(s.cancelled for s in a.active)

    def _admit(self) -> list[Sequence]:
        """Under the lock, at a token boundary: drop the cancelled, admit the queued that fit."""
        a = self.admission
        a.drop_cancelled()
        for seq in a.admit():
            seq.cache = self._new_cache()
            self.metrics.prompt_tokens.inc(len(seq.request.prompt_ids))
        self._gauges()
        return list(a.active)

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _gauges(self) -> None:
        a = self.admission
        self.metrics.queue_depth.set(len(a.queue))
        self.metrics.active.set(len(a.active))
        self.metrics.kv_reserved.set(a.reserved)

    def _step(self, batch: list[Sequence]) -> None:
        plan = plan_step(batch, self.limits.prefill_chunk)
        if not plan:
            return
        self.rendezvous.open([id(s) for s, _ in plan])
        futures = [self._pool.submit(self._forward, s, ids) for s, ids in plan]
        self.metrics.steps.inc()
        self.metrics.batch_size.observe(len(plan))
        self.metrics.batch_rows.observe(sum(len(ids) for _, ids in plan))
        failed: list[tuple[Sequence, BaseException]] = []
        for (seq, ids), future in zip(plan, futures, strict=True):
            try:
                logits = future.result()
            except Exception as e:
                failed.append((seq, e))
                continue
            seq.fed(len(ids))
            if not seq.pending and not seq.cancelled:
                self._emit(seq, logits)
        for seq, e in failed:
            self._fail([seq], _as_api_error(e))
        with self._lock:
            for seq in batch:
                if seq.done and seq in self.admission.active:
                    self.admission.release(seq)
            self._gauges()

    def _forward(self, seq: Sequence, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode(), self.rendezvous.seat(id(seq), seq.tally):
            out = self.model(
                input_ids=torch.tensor([ids]), cache=seq.cache, use_cache=True, logits_to_keep=1
            )
        return out.logits[0, -1]

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> None:
        _, gap = seq.accept(logits)
        self.metrics.completion_tokens.inc()
        if gap is None:
            self.metrics.ttft.observe(seq.last_token_at - seq.submitted)
        else:
            self.metrics.inter_token.observe(gap)

    def _fail(self, seqs: list[Sequence], error: ApiError) -> None:
        with self._lock:
            for seq in seqs:
                if not seq.done:
                    seq.fail(error)
                if seq in self.admission.active:
                    self.admission.release(seq)
            self._gauges()


def plan_step(batch: list[Sequence], prefill_chunk: int) -> list[tuple[Sequence, list[int]]]:
    """What each sequence feeds this step: decoders one token each, always; prefilling ones
    chunks of their prompts, in arrival order, `prefill_chunk` tokens in all."""
    decoding = [s for s in batch if s.generated and len(s.pending) == 1]
    plan = [(s, s.take(1)) for s in decoding]
    budget = prefill_chunk
    for s in batch:
        if budget <= 0:
            break
        if s.pending and s not in decoding:
            chunk = s.take(budget)
            budget -= len(chunk)
            plan.append((s, chunk))
    return plan


def _as_api_error(e: BaseException) -> ApiError:
    if isinstance(e, DispatchError):
        return ApiError(503, f"the swarm could not compute this step: {e}", retry_after=5)
    log.error("a sequence's forward failed", exc_info=e)
    return ApiError(500, "internal error while generating")
