"""The `--experts` grammar: which (layer, expert) pairs a peer hosts.

`LAYERS:EXPERTS[,LAYERS:EXPERTS...]`, each side `N`, `A-B` or `*`; a lone `*` is every
expert. Peers parse it (`moe-peer serve --experts`), coordinators and tools format it
(`status`, placement, local swarms): both sides must read it the same way, so it lives here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable


def _parse_range(text: str, limit: int, what: str) -> list[int]:
    if text == "*":
        return list(range(limit))
    lo, sep, hi = text.partition("-")
    try:
        start, stop = int(lo), int(hi if sep else lo)
    except ValueError:
        raise ValueError(f"bad {what} range {text!r}: expected N, A-B or *") from None
    if start > stop:
        raise ValueError(f"{what} range {text!r} is reversed: write {stop}-{start}")
    if not 0 <= start <= stop < limit:
        raise ValueError(f"{what} range {text!r} is outside 0..{limit - 1}")
    return list(range(start, stop + 1))


def parse_expert_spec(spec: str, num_layers: int, num_experts: int) -> list[tuple[int, int]]:
    """'0:0-3,1:*' -> [(0,0),(0,1),(0,2),(0,3),(1,0),...]; '*' hosts every expert."""
    spec = spec.strip()
    if spec == "*":
        spec = "*:*"
    chosen: set[tuple[int, int]] = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        layers, sep, experts = item.partition(":")
        if not sep:
            raise ValueError(f"bad expert spec item {item!r}: expected LAYERS:EXPERTS, e.g. 0:0-3 or 1:*")
        for layer in _parse_range(layers, num_layers, "layer"):
            chosen.update((layer, e) for e in _parse_range(experts, num_experts, "expert"))
    if not chosen:
        raise ValueError(f"expert spec {spec!r} selects no expert")
    return sorted(chosen)


def ranges(values: Iterable[int]) -> list[str]:
    """[0, 1, 2, 5] -> ['0-2', '5'] (values sorted, duplicates dropped)."""
    parts = []
    for _, run in itertools.groupby(enumerate(sorted(set(values))), key=lambda iv: iv[1] - iv[0]):
        run = [v for _, v in run]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return parts


def format_expert_spec(pairs: Iterable[tuple[int, int]], layer_experts: dict[int, set[int]] | None = None) -> str:
    """[(0, 0), (0, 1), (0, 2), (1, 5)] -> '0:0-2,1:5' (compact, parses back to the same pairs);
    a layer whose hosted experts equal `layer_experts[layer]` (all of that layer's) reads `L:*`."""
    per_layer: dict[int, set[int]] = {}
    for layer, expert in pairs:
        per_layer.setdefault(layer, set()).add(expert)
    items = []
    for layer, experts in sorted(per_layer.items()):
        parts = ["*"] if experts == (layer_experts or {}).get(layer) else ranges(experts)
        items += [f"{layer}:{p}" for p in parts]
    return ",".join(items)


def expert_slices(num_experts: int, peers: int) -> list[str]:
    """Split expert ids into `peers` contiguous ranges, every layer alike: '*:0-2', '*:3-5', ..."""
    bounds = [round(i * num_experts / peers) for i in range(peers + 1)]
    return [f"*:{lo}-{hi - 1}" for lo, hi in itertools.pairwise(bounds) if hi > lo]
