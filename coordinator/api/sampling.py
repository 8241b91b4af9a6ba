"""The next token from one sequence's last logits: greedy at temperature 0, else top-p sampling
with the request's own generator (a seed makes it repeatable)."""

from __future__ import annotations

import torch


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % 2**64)
    return generator


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """logits [V] -> a token id."""
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        before = ordered.cumsum(0) - ordered  # mass of the tokens ranked above each one
        ordered[before >= top_p] = 0.0  # keep the smallest prefix whose mass reaches top_p (>= 1 token)
        probs = torch.zeros_like(probs).scatter_(0, order, ordered)
    return int(torch.multinomial(probs, 1, generator=generator))
