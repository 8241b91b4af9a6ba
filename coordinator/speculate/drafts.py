"""The drafts speculative decoding can use, each a transformers CandidateGenerator whose
draft length is set before every pass:

- `PromptLookupDraft`: continues an n-gram seen earlier in the text (needs no model);
- `ModelDraft`: a small local model that shares the tokenizer;
- `TrunkDraft`: the swarm model itself with its routed experts skipped: its dense trunk
  (embeddings, attention, norms, shared experts, head) runs here without one round trip,
  so it drafts at local speed with no second model to load or to keep in step.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers.generation.candidate_generator import (
    AssistedCandidateGenerator,
    CandidateGenerator,
    PromptLookupCandidateGenerator,
    _prepare_attention_mask,
    _prepare_position_ids,
)

DRAFT_KINDS = ("lookup", "draft-model", "trunk")


class SizedCandidates(Protocol):
    """A CandidateGenerator whose next draft length can be set."""

    def set_length(self, tokens: int) -> None: ...

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs: Any) -> tuple[torch.LongTensor, Any]: ...


class Draft(Protocol):
    """Makes the candidate generator for one generate call."""

    name: str

    def candidates(self, target: Any, setup: dict[str, Any]) -> SizedCandidates: ...


class _LookupCandidates(PromptLookupCandidateGenerator):
    def set_length(self, tokens: int) -> None:
        self.num_output_tokens = tokens


class _AssistedCandidates(AssistedCandidateGenerator):
    """A draft model's candidates; the draft length is ours to set (no heuristic schedule, no confidence cut)."""

    skip_experts: Any = None  # a context manager factory, for the trunk draft

    def set_length(self, tokens: int) -> None:
        self.num_assistant_tokens = tokens

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs: Any):
        if self.assistant_kwargs.get("cache") is None:
            # a draft first asked after the prompt's pass has no cache yet: mask and positions cover the whole text
            length = input_ids.shape[-1]
            self.assistant_kwargs = _prepare_attention_mask(self.assistant_kwargs, length, False)
            self.assistant_kwargs = _prepare_position_ids(self.assistant_kwargs, length, False)
        if self.skip_experts is None:
            return super().get_candidates(input_ids, **kwargs)
        with self.skip_experts():
            return super().get_candidates(input_ids, **kwargs)

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        pass  # the length is the controller's (coordinator/speculate/controller.py)


def _assisted(assistant: Any, setup: dict[str, Any]) -> _AssistedCandidates:
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0  # None would be filled with the 0.4 default
    return _AssistedCandidates(
        input_ids=setup["input_ids"],
        assistant_model=assistant,
        generation_config=setup["generation_config"],
        model_kwargs=setup["model_kwargs"],
        inputs_tensor=setup["inputs_tensor"],
        logits_processor=setup["logits_processor"],
    )


class PromptLookupDraft:
    name = "lookup"

    def __init__(self, max_ngram: int = 3) -> None:
        self.max_ngram = max_ngram

    def candidates(self, target: Any, setup: dict[str, Any]) -> SizedCandidates:
        config = setup["generation_config"]
        return _LookupCandidates(
            eos_token_id=config._eos_token_tensor,
            num_output_tokens=1,
            max_matching_ngram_size=self.max_ngram,
            max_length=config.max_length,
            logits_processor=setup["logits_processor"],
            vocab_size=target.config.get_text_config().vocab_size,
        )


class ModelDraft:
    name = "draft-model"

    def __init__(self, model: Any) -> None:
        self.model = model

    def candidates(self, target: Any, setup: dict[str, Any]) -> SizedCandidates:
        draft_vocab = self.model.config.get_text_config().vocab_size
        target_vocab = target.config.get_text_config().vocab_size
        if draft_vocab != target_vocab:
            raise ValueError(f"the draft model's vocabulary ({draft_vocab}) is not the target's ({target_vocab})")
        return _assisted(self.model, setup)


class TrunkDraft:
    name = "trunk"

    def __init__(self, skip_experts: Any) -> None:
        """`skip_experts()`: a context in which the target's routed experts contribute nothing."""
        self.skip_experts = skip_experts

    def candidates(self, target: Any, setup: dict[str, Any]) -> SizedCandidates:
        generator = _assisted(target, setup)
        generator.skip_experts = self.skip_experts
        return generator


__all__ = ["DRAFT_KINDS", "CandidateGenerator", "Draft", "ModelDraft", "PromptLookupDraft", "TrunkDraft"]
