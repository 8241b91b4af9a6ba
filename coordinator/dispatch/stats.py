"""Counting what dispatch did: DispatchStats, and percentiles to read it."""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field


def percentile(values: Collection[float], q: float) -> float:
    """q in [0, 100], linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


MAX_EVIDENCE_KEPT = 64  # convictions whose evidence stays in memory (the trust store keeps its own files)
# Latency samples kept per series (RPCs, each layer, peer compute): percentiles describe the
# most recent calls, and a gateway that answers for weeks holds 4096 floats per series, not
# every call it ever made (about 100 MB an hour at a thousand layer calls a second).
SAMPLES_KEPT = 4096


def samples() -> deque[float]:
    return deque(maxlen=SAMPLES_KEPT)


@dataclass
class DispatchStats:
    """Counters over the life of a dispatcher; every routed (token, slot) is counted."""

    rpcs: int = 0
    routed: int = 0
    exact: int = 0
    rerouted: int = 0
    dropped: int = 0
    retries: int = 0  # experts re-sent after a failed or refused call
    hedges: int = 0  # duplicate calls sent because the first was slower than its peer's p95
    bans: int = 0  # every ban: failed calls, bad receipts and proven cheaters
    refusals: int = 0  # RESOURCE_EXHAUSTED answers (peer overloaded): retried elsewhere, no ban
    leaving: int = 0  # answers of a peer that is draining or joining: retried elsewhere, no ban
    bad_receipts: int = 0  # answers whose receipt did not verify (the peer is banned)
    spot_checks: int = 0  # experts recomputed on a second replica to verify the first
    spot_unresolved: int = 0  # disagreements nothing could settle: the disputed answer was not used
    spot_resolved_locally: int = 0  # disagreements settled by recomputing the expert on the coordinator
    spot_unverified: int = 0  # sampled experts no independent replica could check
    nonfinite: int = 0  # answers holding NaN or inf (refused, the peer banned with backoff)
    cheaters_banned: int = 0
    banned_at_start: int = 0  # peers banned by earlier runs (the trust store), still banned
    evidence: list[dict] = field(default_factory=list)  # signed receipts of each proven-wrong answer
    rpc_ms: deque[float] = field(default_factory=samples)
    layer_ms: dict[int, deque[float]] = field(default_factory=dict)  # whole layer calls, by layer
    calls_by_layer: Counter[int] = field(default_factory=Counter)  # every call (layer_ms keeps the recent ones)
    peer_compute_ms: deque[float] = field(default_factory=samples)  # as reported by the peers
    rpcs_by_peer: Counter[str] = field(default_factory=Counter)
    rows_by_peer: Counter[str] = field(default_factory=Counter)
    endpoints: dict[str, str] = field(default_factory=dict)  # peer id -> endpoint it was reached at

    @property
    def layer_calls(self) -> int:
        return sum(self.calls_by_layer.values())

    # ---- recording (the dispatcher's only way in) -------------------------------------------
    def record_rpc(self, peer: str, endpoint: str, rows: int, ms: float) -> None:
        """An answered Forward: `rows` output rows in `ms` round trip."""
        self.rpcs += 1
        self.rpc_ms.append(ms)
        self.rpcs_by_peer[peer] += 1
        self.rows_by_peer[peer] += rows
        self.endpoints[peer] = endpoint

    def record_peer_compute(self, ms: float) -> None:
        self.peer_compute_ms.append(ms)

    def record_failure(self, refused: bool, retried: int, leaving: bool = False) -> None:
        """A failed Forward: refused (overloaded or leaving: no ban) or banned; `retried` experts to send again."""
        if leaving:
            self.leaving += 1
        elif refused:
            self.refusals += 1
        else:
            self.bans += 1
        self.retries += retried

    def record_hedge(self) -> None:
        self.hedges += 1

    def record_bad_receipt(self) -> None:
        self.bans += 1
        self.bad_receipts += 1

    def record_spot_checks(self, experts: int) -> None:
        self.spot_checks += experts

    def record_spot_unresolved(self) -> None:
        self.spot_unresolved += 1

    def record_spot_resolved_locally(self) -> None:
        self.spot_resolved_locally += 1

    def record_spot_unverified(self, experts: int) -> None:
        self.spot_unverified += experts

    def record_nonfinite(self) -> None:
        self.nonfinite += 1

    def record_cheater(self, evidence: dict, new_peer: bool = True) -> None:
        """A proven-wrong answer; `new_peer`: its peer was not convicted before (one ban per peer)."""
        if new_peer:
            self.bans += 1
            self.cheaters_banned += 1
        if len(self.evidence) < MAX_EVIDENCE_KEPT:
            self.evidence.append(evidence)

    def record_layer(self, layer: int, routed: int, rerouted: int, dropped: int, ms: float) -> None:
        """A finished layer call: every routed (token, slot) is exact, rerouted or dropped."""
        self.routed += routed
        self.exact += routed - dropped - rerouted
        self.rerouted += rerouted
        self.dropped += dropped
        self.calls_by_layer[layer] += 1
        series = self.layer_ms.get(layer)
        if series is None:
            series = self.layer_ms[layer] = samples()
        series.append(ms)

    def clear_samples(self) -> None:
        """Forget the latency samples, keep the counts: a benchmark's warm-up is over."""
        for series in (self.rpc_ms, self.peer_compute_ms, *self.layer_ms.values()):
            series.clear()

    # ---- combining ---------------------------------------------------------------------------
    @classmethod
    def merge(cls, all_stats: Iterable[DispatchStats]) -> DispatchStats:
        """The sum of several dispatchers' stats (e.g. one per coordinator); the inputs are unchanged."""
        total = cls()
        rules = _merge_rules(cls)
        for stats in all_stats:
            for name, add in rules.items():
                add(total, name, getattr(stats, name))
        return total


Rule = Callable[[DispatchStats, str, typing.Any], None]


def _add(total: DispatchStats, name: str, value: int) -> None:
    setattr(total, name, getattr(total, name) + value)


def _extend(total: DispatchStats, name: str, value: list) -> None:
    getattr(total, name).extend(value)


def _joined(a: deque, b: deque) -> deque:
    """Both windows whole: a merged snapshot holds every input's recent samples."""
    return deque([*a, *b], maxlen=None if a.maxlen is None or b.maxlen is None else a.maxlen + b.maxlen)


def _join(total: DispatchStats, name: str, value: deque) -> None:
    setattr(total, name, _joined(getattr(total, name), value))


def _join_per_key(total: DispatchStats, name: str, value: dict[typing.Any, deque]) -> None:
    merged = getattr(total, name)
    for key, items in value.items():
        merged[key] = _joined(merged.get(key, deque(maxlen=0)), items)


def _count(total: DispatchStats, name: str, value: Counter) -> None:
    getattr(total, name).update(value)  # Counter.update adds


def _overwrite(total: DispatchStats, name: str, value: dict) -> None:
    getattr(total, name).update(value)  # later wins: e.g. the endpoint a peer was last reached at


@functools.cache
def _merge_rules(cls: type[DispatchStats]) -> dict[str, Rule]:
    """How each field merges, decided by its type, so a new field either merges or fails loudly."""
    hints = typing.get_type_hints(cls)
    rules: dict[str, Rule] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
        if hint is int:
            rules[f.name] = _add
        elif origin is list:
            rules[f.name] = _extend
        elif origin is deque:
            rules[f.name] = _join
        elif origin is Counter:
            rules[f.name] = _count
        elif origin is dict and len(args) == 2 and typing.get_origin(args[1]) is deque:
            rules[f.name] = _join_per_key
        elif origin is dict and args == (str, str):
            rules[f.name] = _overwrite
        else:
            raise TypeError(f"DispatchStats.merge has no rule for field {f.name}: {hint}")
    return rules
