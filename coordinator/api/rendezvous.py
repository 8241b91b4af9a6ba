"""One layer call per MoE layer per step, whatever the number of sequences in the step.

Each sequence of a step runs its own forward (its own KV cache, on a worker thread). When
its forward reaches an MoE layer, its RemoteExperts call comes here and waits; once every
sequence still in the step has arrived, the last one to arrive sends all their rows as one
dispatch, splits the result back by sequence, and counts each sequence's (token, expert)
pairs as exact, rerouted or dropped in its own tally. A sequence whose forward ends (or
fails) leaves the step, so the others never wait for it.

The sequences' dense parts run in turn, not at once: their threads would contend for the
GIL at every small torch op, and the hand-offs cost more than the second core gives (16
one-token forwards of a hidden-256 model: 52 ms in turn, 100 ms at once, on 2 cores). A
sequence holds its turn while it computes and gives it up while it waits for the swarm.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import torch

from coordinator.api.sequence import Tally
from coordinator.dispatch.dispatcher import DispatchResult, ScoresFn
from coordinator.models.remote_moe import ExpertExecutor


@dataclass
class _Arrival:
    x: torch.Tensor
    experts: torch.Tensor
    uids: list[str]
    dtype: torch.dtype
    scores: ScoresFn
    tally: Tally | None
    result: DispatchResult | None = None
    error: BaseException | None = None


class StepRendezvous:
    """An ExpertExecutor for the sequences of a step; calls from threads outside a step go straight through."""

    def __init__(self, executor: ExpertExecutor, computing: int = 1) -> None:
        self.executor = executor
        self._turns = threading.Semaphore(computing)  # sequences computing their dense part at once
        self.merged_calls = 0  # dispatches sent (each carries every arrived sequence's rows)
        self._cond = threading.Condition()
        self._members: set[Hashable] = set()
        self._waiting: dict[Hashable, _Arrival] = {}
        self._seat = threading.local()

    def open(self, members: list[Hashable]) -> None:
        """A step begins with these sequences."""
        with self._cond:
            if self._members or self._waiting:
                raise RuntimeError("a step is already running")
            self._members = set(members)

    @contextlib.contextmanager
    def seat(self, member: Hashable, tally: Tally | None) -> Iterator[None]:
        """Run one sequence's forward on this thread as `member`; it leaves the step on exit."""
        self._seat.member, self._seat.tally = member, tally
        self._take_turn()
        try:
            yield
        finally:
            self._seat.member = self._seat.tally = None
            self._give_turn()
            self._leave(member)

    def _take_turn(self) -> None:
        self._turns.acquire()
        self._seat.turn = True

    def _give_turn(self) -> None:
        if getattr(self._seat, "turn", False):
            self._seat.turn = False
            self._turns.release()

    def dispatch(
        self, x: torch.Tensor, experts: torch.Tensor, uids: list[str], dtype: torch.dtype, scores: ScoresFn = None
    ) -> DispatchResult:
        member = getattr(self._seat, "member", None)
        if member is None:
            return self.executor.dispatch(x, experts, uids, dtype, scores)
        arrival = _Arrival(x, experts, uids, dtype, scores, self._seat.tally)
        self._give_turn()  # the others compute while this one waits
        with self._cond:
            self._waiting[member] = arrival
            batch = self._take_if_complete()
        if batch:
            self._run(batch)
        with self._cond:
            while arrival.result is None and arrival.error is None:
                self._cond.wait()
        if arrival.error is not None:
            raise arrival.error
        self._take_turn()
        return arrival.result

    def _leave(self, member: Hashable) -> None:
        with self._cond:
            self._members.discard(member)
            self._waiting.pop(member, None)
            batch = self._take_if_complete()
        if batch:
            self._run(batch)

    def _take_if_complete(self) -> list[_Arrival]:
        """Under the lock: every member is waiting -> their arrivals (the caller runs them)."""
        if not self._waiting or set(self._waiting) != self._members:
            return []
        batch = list(self._waiting.values())
        self._waiting.clear()
        return batch

    def _run(self, batch: list[_Arrival]) -> None:
        groups: dict[tuple, list[_Arrival]] = {}  # one layer per group: normally a single group
        for a in batch:
            groups.setdefault((tuple(a.uids), a.dtype, a.experts.shape[1]), []).append(a)
        for group in groups.values():
            try:
                self._dispatch_group(group)
            except BaseException as e:  # every waiter gets the error: their forwards fail alike
                for a in group:
                    a.error = e
        with self._cond:
            self._cond.notify_all()

    def _dispatch_group(self, group: list[_Arrival]) -> None:
        first = group[0]
        x = torch.cat([a.x.reshape(-1, a.x.shape[-1]) for a in group])
        experts = torch.cat([a.experts for a in group])
        scores = None
        if all(a.scores is not None for a in group):
            scores = lambda: torch.cat([a.scores() for a in group])  # noqa: E731
        self.merged_calls += 1
        result = self.executor.dispatch(x, experts, first.uids, first.dtype, scores)
        start = 0
        for a in group:
            rows = slice(start, start + a.experts.shape[0])
            start = rows.stop
            a.result = DispatchResult(result.outputs[rows], result.answered[rows], result.experts[rows])
            if a.tally is not None:
                answered = a.result.answered
                rerouted = int((answered & (a.result.experts != a.experts)).sum())
                dropped = int((~answered).sum())
                a.tally.add(answered.numel() - rerouted - dropped, rerouted, dropped)
