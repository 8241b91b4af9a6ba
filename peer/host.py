"""The peer's process on its host: which CPUs do what, and handing freed memory back."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

from protos.expert_spec import ranges


def parse_cpu_list(text: str) -> frozenset[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6} (the notation of taskset and /sys/devices/system/cpu)."""
    cpus: set[int] = set()
    for item in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = item.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"bad CPU list item {item!r}: expected N or A-B") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {item!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"CPU list {text!r} names no CPU")
    return frozenset(cpus)


def split_cpus(compute: frozenset[int]) -> None:
    """Pin this process's threads (and every thread and process it starts from now on) to the
    allowed CPUs outside `compute`, which the compute thread takes (ExpertServicer pins it)."""
    allowed = os.sched_getaffinity(0)
    if not compute <= allowed:
        missing, have = sorted(compute - allowed), sorted(allowed)
        raise ValueError(
            f"--compute-cpus {','.join(ranges(compute))}: CPUs {missing} are not available to this process "
            f"(it has {have})"
        )
    host = allowed - compute
    os.sched_setaffinity(0, host or allowed)  # threads inherit their creator's CPUs


def release_freed_memory() -> None:
    """Hand the heap that loading freed (read buffers, digests) back to the OS: glibc keeps it
    otherwise, and a peer's footprint should be its experts, not its load history."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim this way
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
