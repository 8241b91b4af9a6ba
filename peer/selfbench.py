"""The peer's self-measured expert throughput, cached per device and expert shape.

A short benchmark of one hosted expert, kept in ~/.cache/moe-swarm/throughput.json so
restarts announce a number at once and peers on the same hardware and expert shape share
it. A cached number is only trusted while it is younger than `MAX_AGE_S` and a quick probe
at start (a few small calls) agrees with it within `PLAUSIBLE_RATIO`: drivers, clocks and
thread counts change under a cache, and a number off by 100x would mislead every router.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from protos.plumbing.files import write_json_atomic

from .backends.base import ExpertBackend

MAX_AGE_S = 7 * 24 * 3600.0
PLAUSIBLE_RATIO = 4.0  # a probe this many times off either way means the cache no longer describes this machine
PROBE_ROWS, PROBE_REPEATS = 128, 1  # the benchmark's batch (throughput depends on it), timed once
DEFAULT_CACHE = Path(os.environ.get("MOE_SWARM_CACHE", Path.home() / ".cache" / "moe-swarm")) / "throughput.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()}-{platform.processor() or 'cpu'}-{torch.get_num_threads()}threads"


def cached_throughput(
    experts: ExpertBackend, cache: Path = DEFAULT_CACHE, remeasure: bool = False, now: float | None = None
) -> float:
    """Tokens/s of one hosted expert: the cached number while it is fresh and plausible, else
    measured again (and cached). `remeasure`: measure regardless (`moe-peer serve --remeasure`)."""
    key = f"{experts.kind}/{experts.hidden_dim}x{experts.ffn_dim}/{experts.dtype}/{device_name(experts.device)}"
    now = time.time() if now is None else now
    table = _read(cache)
    entry = table.get(key)
    if not remeasure and _fresh(entry, now) and _plausible(entry["tokens_per_s"], experts):
        return float(entry["tokens_per_s"])
    value = experts.measure_throughput()
    table[key] = {"tokens_per_s": value, "measured_at": now}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, table, indent=1, sort_keys=True)  # peers starting together never read half a file
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return value


def _read(cache: Path) -> dict:
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _fresh(entry: object, now: float) -> bool:
    if not isinstance(entry, dict):
        return False  # absent, or a bare number without a date
    value, at = entry.get("tokens_per_s"), entry.get("measured_at")
    ok = isinstance(value, int | float) and value > 0 and isinstance(at, int | float)
    return ok and 0 <= now - at < MAX_AGE_S


def _plausible(cached: float, experts: ExpertBackend) -> bool:
    probe = experts.measure_throughput(rows=PROBE_ROWS, repeats=PROBE_REPEATS)
    return 1 / PLAUSIBLE_RATIO <= cached / max(probe, 1e-9) <= PLAUSIBLE_RATIO
