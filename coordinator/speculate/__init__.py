"""Speculative decoding through the swarm: drafts, the adaptive draft length, the generate loop."""

from coordinator.speculate.controller import DraftLength, FixedLength
from coordinator.speculate.decode import SpecStats, SpeculativeRun, speculative_generate
from coordinator.speculate.drafts import DRAFT_KINDS, ModelDraft, PromptLookupDraft, TrunkDraft

__all__ = [
    "DRAFT_KINDS",
    "DraftLength",
    "FixedLength",
    "ModelDraft",
    "PromptLookupDraft",
    "SpecStats",
    "SpeculativeRun",
    "TrunkDraft",
    "speculative_generate",
]
