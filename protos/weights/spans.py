"""Byte spans [start, end) of a file: coalesce what is needed, subtract what is held."""

from __future__ import annotations

from collections.abc import Iterable

Span = tuple[int, int]


def coalesce(spans: Iterable[Span], gap: int = 0) -> list[Span]:
    """Sorted, merged spans; spans at most `gap` bytes apart become one."""
    out: list[list[int]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if out and start <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def subtract(spans: Iterable[Span], held: Iterable[Span]) -> list[Span]:
    """The parts of `spans` not covered by `held`."""
    held = coalesce(held)
    out: list[Span] = []
    for start, end in coalesce(spans):
        for h_start, h_end in held:
            if h_end <= start or h_start >= end:
                continue
            if h_start > start:
                out.append((start, h_start))
            start = max(start, h_end)
            if start >= end:
                break
        if start < end:
            out.append((start, end))
    return out


def total(spans: Iterable[Span]) -> int:
    return sum(end - start for start, end in spans)


def overlap(spans: Iterable[Span], others: Iterable[Span]) -> int:
    """Bytes of `spans` that fall inside `others`."""
    spans = coalesce(spans)
    return total(spans) - total(subtract(spans, others))
