"""The peer's self-measured expert throughput, cached per device and expert shape.

Measured once (a short benchmark of one hosted expert) and kept in
~/.cache/moe-swarm/throughput.json, so restarts announce a number at once and every
peer on the same hardware with the same expert shape reuses it.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from protos.plumbing.files import write_json_atomic

from .backends.base import ExpertBackend

DEFAULT_CACHE = Path(os.environ.get("MOE_SWARM_CACHE", Path.home() / ".cache" / "moe-swarm")) / "throughput.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()}-{platform.processor() or 'cpu'}-{torch.get_num_threads()}threads"


def cached_throughput(experts: ExpertBackend, cache: Path = DEFAULT_CACHE) -> float:
    key = f"{experts.kind}/{experts.hidden_dim}x{experts.ffn_dim}/{experts.dtype}/{device_name(experts.device)}"
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        table = {}
    if isinstance(table.get(key), int | float) and table[key] > 0:
        return float(table[key])
    value = experts.measure_throughput()
    table[key] = value
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, table, indent=1, sort_keys=True)  # peers starting together never read half a file
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return value
