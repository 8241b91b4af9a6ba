"""Which experts to host: the least-covered ones of the swarm that fit a memory budget.

A peer started with `--experts auto --memory-budget 8GiB` reads the DHT's coverage of its
model (serving replicas per expert) and takes the experts with the fewest replicas, ties
broken at random, until the budget is full. A random start delay keeps peers started
together from reading the same coverage and picking the same set. Later it re-checks: it
moves only when another set would raise the swarm's weakest coverage (hysteresis: the
improvement must be strict and seen on consecutive checks), draining before it switches.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    # a bare letter is binary, as in `docker --memory 8g` and `free -g`
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}


def parse_bytes(text: str) -> int:
    """'8GiB', '512MB', '1.5gib', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in _UNITS:
        raise ValueError(f"bad size {text!r}: expected a number with an optional unit like 512MiB or 8GB")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def choose_experts(
    candidates: Iterable[tuple[int, int]],
    replicas: dict[tuple[int, int], int],
    expert_bytes: int,
    budget: int,
    rng: random.Random | None = None,
) -> list[tuple[int, int]]:
    """The least-replicated experts (random among equals) that fit in `budget` bytes."""
    rng = rng or random.Random()
    if expert_bytes <= 0:
        raise ValueError("expert size must be positive")
    capacity = budget // expert_bytes
    if capacity < 1:
        raise ValueError(f"a memory budget of {budget} bytes holds no expert ({expert_bytes} bytes each)")
    ranked = sorted(candidates, key=lambda c: (replicas.get(c, 0), rng.random()))
    return sorted(ranked[:capacity])


def weakest_coverage(
    candidates: Iterable[tuple[int, int]], others: dict[tuple[int, int], int], hosted: Iterable[tuple[int, int]]
) -> int:
    """The fewest serving replicas of any expert if we host `hosted` and the others stay as they are."""
    mine = set(hosted)
    return min(others.get(c, 0) + (c in mine) for c in candidates)


def better_placement(
    candidates: list[tuple[int, int]],
    others: dict[tuple[int, int], int],
    current: list[tuple[int, int]],
    expert_bytes: int,
    budget: int,
    rng: random.Random | None = None,
) -> list[tuple[int, int]] | None:
    """A set that strictly raises the weakest coverage over keeping `current`, else None.
    `others` counts replicas without this peer."""
    proposal = choose_experts(candidates, others, expert_bytes, budget, rng)
    if weakest_coverage(candidates, others, proposal) > weakest_coverage(candidates, others, current):
        return proposal
    return None
