"""One request in the running batch: its tokens, cache, sampler, stop rules and the text it has sent."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from coordinator.api.errors import ApiError
from coordinator.api.params import GenerationRequest
from coordinator.api.sampling import make_generator, next_token


@dataclass
class Tally:
    """This request's routed (token, expert) pairs by outcome: what `x_moe_swarm` reports."""

    exact: int = 0
    rerouted: int = 0
    dropped: int = 0

    def add(self, exact: int, rerouted: int, dropped: int) -> None:
        self.exact += exact
        self.rerouted += rerouted
        self.dropped += dropped

    def as_dict(self) -> dict[str, int]:
        return {"exact": self.exact, "rerouted": self.rerouted, "dropped": self.dropped}


@dataclass
class Event:
    """What the engine tells the request's handler: more text, the end, or an error."""

    text: str = ""
    finish_reason: str | None = None  # set on the last event: "stop" or "length"
    error: ApiError | None = None


@dataclass
class Sequence:
    request: GenerationRequest
    tokenizer: Any
    eos_ids: frozenset[int]
    sink: Callable[[Event], None]  # called on the engine's thread; must not block
    pending: list[int] = field(default_factory=list)  # tokens not yet fed to the model (the prompt, then the last)
    generated: list[int] = field(default_factory=list)
    cache: Any = None  # the model's KV cache, created when admitted
    tally: Tally = field(default_factory=Tally)
    cancelled: bool = False  # the client went away: leave at the next token boundary
    finish_reason: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    _sent: int = 0  # characters of text already sent

    def __post_init__(self) -> None:
        self.pending = list(self.request.prompt_ids)
        self.generator = make_generator(self.request.sampling.seed)

    @property
    def reserved_tokens(self) -> int:
        """KV cache positions this sequence may fill: prompt + every token it may generate."""
        return len(self.request.prompt_ids) + self.request.sampling.max_tokens

    def take(self, budget: int) -> list[int]:
        """The tokens to feed this step: the last token, or up to `budget` prompt tokens."""
        return self.pending[: max(budget, 1)]

    def fed(self, count: int) -> None:
        del self.pending[:count]

    def accept(self, logits: torch.Tensor) -> tuple[int, float | None]:
        """Sample the next token from the last position's logits and send what text is final.
        Returns the token and the seconds since the previous one (None for the first)."""
        s = self.request.sampling
        token = next_token(logits, s.temperature, s.top_p, self.generator)
        now = time.perf_counter()
        gap = None if self.last_token_at is None else now - self.last_token_at
        self.last_token_at = now
        self.generated.append(token)
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        if token in self.eos_ids:
            self.finish_reason = "stop"
        for stop in s.stop:
            at = text.find(stop)
            if at >= 0:
                text, self.finish_reason = text[:at], "stop"
        if self.finish_reason is None and len(self.generated) >= s.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is None:
            self.pending.append(token)
            final = len(text) - (max(map(len, s.stop)) - 1 if s.stop else 0)  # a stop may still begin there
            while final > self._sent and text[final - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                final -= 1
            if final > self._sent:
                self.sink(Event(text[self._sent : final]))
                self._sent = final
        else:
            self.sink(Event(text[self._sent :], self.finish_reason))
        return token, gap

    def fail(self, error: ApiError) -> None:
        self.finish_reason = "error"
        self.sink(Event(error=error))

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.request.prompt_ids), len(self.generated)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
