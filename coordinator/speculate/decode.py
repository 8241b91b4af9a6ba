"""Speculative decoding through the swarm: a draft proposes tokens, one pass of the swarm
model checks them all, and the draft length adapts to what passes cost and how often the
draft is right (coordinator/speculate/controller.py).

Built on transformers' assisted decoding (`generate`'s own loop: the KV cache is cropped
after each pass, greedy keeps the target's argmax, sampling uses speculative sampling for
drafts with logits and exact-match sampling for prompt lookup, so the output distribution
is the target's). Ours are the drafts, the length per pass and the counting.

    from coordinator.speculate import PromptLookupDraft, speculative_generate
    run = speculative_generate(model, input_ids, PromptLookupDraft(), max_new_tokens=64)
    run.output_ids, run.stats.acceptance, run.stats.summary()
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.candidate_generator import CandidateGenerator

from coordinator.speculate.controller import DraftLength
from coordinator.speculate.drafts import Draft, SizedCandidates
from coordinator.speculate.meter import MeteredExecutor, meter_model


@dataclass
class SpecStats:
    """What one speculative generation did, pass by pass."""

    draft: str
    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    lengths: list[int] = field(default_factory=list)  # draft length chosen for each pass
    verify_ms: list[float] = field(default_factory=list)
    draft_ms: list[float] = field(default_factory=list)
    experts_per_pass: list[int] = field(default_factory=list)  # distinct (layer, expert) a verify pass woke
    peers_per_pass: list[int] = field(default_factory=list)  # distinct peers that answered in a verify pass
    rpcs_per_layer_call: list[float] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @staticmethod
    def _mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "draft": self.draft,
            "passes": self.passes,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": self.acceptance,
            "mean_draft_length": self._mean(self.lengths),
            "experts_per_verify_pass": self._mean(self.experts_per_pass),
            "peers_per_verify_pass": self._mean(self.peers_per_pass),
            "peers_per_layer_call": self._mean(self.rpcs_per_layer_call),
            "verify_pass_ms": self._mean(self.verify_ms),
        }

    def summary(self) -> str:
        d = self.as_dict()
        return (
            f"speculation ({self.draft}): {self.passes} verify passes, {self.drafted} drafted, {self.accepted} "
            f"accepted (acceptance {d['acceptance']:.2f}), mean draft length {d['mean_draft_length']:.2f}; per "
            f"verify pass: {d['experts_per_verify_pass']:.1f} experts, {d['peers_per_verify_pass']:.1f} peers, "
            f"{d['verify_pass_ms']:.1f} ms; {d['peers_per_layer_call']:.2f} peers per layer call"
        )


class AdaptiveCandidates(CandidateGenerator):
    """Wraps a draft's candidate generator: sets its length before each pass, times the pass
    (from the candidates' return to the verdict), and counts what it touched."""

    def __init__(
        self, base: SizedCandidates, controller: DraftLength, meter: MeteredExecutor, stats: SpecStats, max_length: int
    ) -> None:
        self.base, self.controller, self.meter, self.stats = base, controller, meter, stats
        self.max_length = max_length
        self.prefill = True
        self._drafted = 0
        self._draft_ms = 0.0
        self._before: tuple = ()
        self._started = 0.0

    @property
    def num_drafting_tokens(self) -> int:
        """The most tokens one pass drafts: generate keeps that many steps of a recurrent cache."""
        return self.controller.max_tokens

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs: Any) -> tuple[torch.LongTensor, Any]:
        budget = self.max_length - input_ids.shape[1] - 1
        # the prompt's pass drafts nothing: its cost (the prefill) says nothing about decoding
        k = 0 if self.prefill else self.controller.next_length(budget)
        started = time.perf_counter()
        ids, logits = input_ids, None
        if k > 0:
            self.base.set_length(k)
            ids, logits = self.base.get_candidates(input_ids)
            ids = ids[:, : input_ids.shape[1] + k]
            if logits is not None:
                logits = logits[:, :k]
        self._drafted = ids.shape[1] - input_ids.shape[1]
        self._draft_ms = (time.perf_counter() - started) * 1e3
        self.stats.lengths.append(k)
        self.meter.experts.clear()
        self._before = self.meter.snapshot()
        self._started = time.perf_counter()
        return ids, logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        verify_ms = (time.perf_counter() - self._started) * 1e3
        accepted = min(int(num_matches), self._drafted)
        self.controller.observe(self._drafted, accepted, verify_ms, self._draft_ms, prefill=self.prefill)
        s = self.stats
        s.passes += 1
        s.drafted += self._drafted
        s.accepted += accepted
        if not self.prefill:
            calls0, peers0, rpcs0 = self._before
            calls1, peers1, rpcs1 = self.meter.snapshot()
            s.verify_ms.append(verify_ms)
            s.draft_ms.append(self._draft_ms)
            s.experts_per_pass.append(len(self.meter.experts))
            s.peers_per_pass.append(sum(1 for p, n in peers1.items() if n > peers0.get(p, 0)))
            if calls1 > calls0:
                s.rpcs_per_layer_call.append((rpcs1 - rpcs0) / (calls1 - calls0))
        self.prefill = False


@dataclass
class SpeculativeRun:
    prompt_ids: torch.Tensor
    output_ids: torch.Tensor  # prompt + new tokens
    seconds: float
    stats: SpecStats
    controller: DraftLength

    @property
    def new_tokens(self) -> int:
        return self.output_ids.shape[-1] - self.prompt_ids.shape[-1]


def speculative_generate(
    model: Any,
    input_ids: torch.Tensor,
    draft: Draft,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    streamer: Any = None,
    controller: DraftLength | None = None,
    **generate_kwargs: Any,
) -> SpeculativeRun:
    """`model.generate` (a model from load_swarm_model, batch of one) with `draft` proposing
    tokens; greedy output is the same as without it, sampling keeps the model's distribution."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one sequence at a time, got a batch of {input_ids.shape[0]}")
    meter = meter_model(model)
    controller = controller or DraftLength()
    stats = SpecStats(draft.name)

    def candidates(**setup: Any) -> AdaptiveCandidates:
        base = draft.candidates(model, setup)
        inner_config = getattr(base, "generation_config", None)
        if inner_config is not None:  # a draft model's own generate must not speculate in turn
            inner_config.prompt_lookup_num_tokens = None
        return AdaptiveCandidates(base, controller, meter, stats, setup["generation_config"].max_length)

    model._get_candidate_generator = candidates  # generate's assisted loop asks the model for its generator
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                streamer=streamer,
                attention_mask=torch.ones_like(input_ids),
                prompt_lookup_num_tokens=controller.max_tokens,  # selects the assisted loop; the length is ours
                **generate_kwargs,
            )
    finally:
        del model._get_candidate_generator
    return SpeculativeRun(input_ids, out, time.perf_counter() - started, stats, controller)
