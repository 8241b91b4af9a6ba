"""`--speculate` and its companions: the flags, and the draft they name."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from coordinator.speculate.controller import DraftLength
from coordinator.speculate.drafts import DRAFT_KINDS, Draft, ModelDraft, PromptLookupDraft, TrunkDraft
from coordinator.speculate.meter import meter_model

MAX_DRAFT_TOKENS = 32  # a verify pass carries at most this many drafted tokens


def add_speculate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculate",
        default="off",
        choices=("off", *DRAFT_KINDS),
        help="draft tokens and check them in one pass through the swarm: lookup (n-grams of the text so far), "
        "draft-model (a small local model with the same tokenizer, --draft-model), trunk (this model's own dense "
        "trunk with the routed experts skipped); the draft length adapts and drafting stops when it would not pay",
    )
    p.add_argument("--draft-model", type=Path, default=None, help="with --speculate draft-model: its checkpoint folder")
    p.add_argument("--max-draft", type=int, default=8, help=f"most tokens drafted for one pass (1-{MAX_DRAFT_TOKENS})")


def check_speculate_args(args: argparse.Namespace) -> None:
    if not 1 <= args.max_draft <= MAX_DRAFT_TOKENS:
        raise ValueError(f"--max-draft must be in 1..{MAX_DRAFT_TOKENS}, got {args.max_draft}")
    if args.speculate == "draft-model" and args.draft_model is None:
        raise ValueError("--speculate draft-model needs --draft-model FOLDER (a small model with the same tokenizer)")
    if args.draft_model is not None and not (args.draft_model / "config.json").is_file():
        raise ValueError(f"--draft-model {args.draft_model}: no config.json there")


def make_draft(kind: str, target: Any, draft_model: Path | None = None) -> Draft:
    """The draft `kind` (one of DRAFT_KINDS) for `target`, a model from load_swarm_model."""
    if kind == "lookup":
        return PromptLookupDraft()
    if kind == "draft-model":
        from transformers import AutoModelForCausalLM

        if draft_model is None:
            raise ValueError("the draft-model draft needs a checkpoint folder")
        return ModelDraft(AutoModelForCausalLM.from_pretrained(draft_model).eval())
    if kind == "trunk":
        return TrunkDraft(meter_model(target).skip)
    raise ValueError(f"unknown draft {kind!r}; known: {', '.join(DRAFT_KINDS)}")


def controller_for(args: argparse.Namespace) -> DraftLength:
    return DraftLength(max_tokens=args.max_draft)
