"""Where one layer call's wall time goes, stage by stage, across the coordinator and the peer.

    .venv/bin/python bench/call_timeline.py --calls 1000

A copy of the packages gets timestamps at 18 points of a call's path (the caller, the
coordinator's I/O loop, the stream, the peer's loop and its compute thread); the `bench
layer` workload then runs on that copy (one peer process hosting every expert), and the
median of each stage between consecutive points is printed. Both processes read the same
CLOCK_MONOTONIC (time.perf_counter_ns), so stages that cross the wire line up. Main keeps no
instrumentation: the points are inserted at exact source lines, and a line that moved makes
this script stop with the anchor it could not find ("after" points sit on one-line statements).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protos", "peer", "coordinator")

TRACE_MODULE = '''"""Timestamps of call_timeline.py (inserted into a copy of the tree, never on main)."""
import atexit, os, time
_out = open(os.path.join(os.environ["MOE_TIMELINE_DIR"], f"{os.getpid()}.txt"), "a", buffering=1 << 20)
atexit.register(_out.close)
def mark(name: str) -> None:
    _out.write(f"{name} {time.perf_counter_ns()}\\n")
    if name == "P6":  # the peer's last point of a call: on disk before the peer is stopped
        _out.flush()
'''

# (file, source line, point, before/after, what the stage that *ends* at this point does)
POINTS = [
    ("coordinator/remote_moe.py", "result = self.executor.dispatch(", "M1", "before", "gate: logits, top-k softmax"),
    ("coordinator/router.py", "num_tokens, k = experts.shape", "D0", "before", "hand-off to the I/O loop thread"),
    ("coordinator/router.py", "written = loop.create_future()", "D1", "before", "group, plan, gather rows, seal"),
    ("coordinator/transport.py", "yield request", "D2", "after", "stream write (gRPC asks for the next request)"),
    ("peer/server.py", "async for request in requests:", "P0", "after", "over loopback into the peer's loop"),
    ("peer/server.py", "out, queue_ms, compute_ms = await", "P1", "before", "validate, open the seal, request digest"),
    ("peer/batcher.py", "if len(items) == 1:", "P2", "before", "batcher queue, hand-off to the compute thread"),
    ("peer/experts.py", "return out.cpu() if out.device.type", "P3", "before", "expert math"),
    ("peer/server.py", "out, queue_ms, compute_ms = await", "P4", "after", "hand-back to the peer's loop"),
    ("peer/server.py", "response.queue_ms, response.compute_ms", "P5", "after", "answer: output digest, seal, receipt"),
    ("peer/server.py", "yield reply", "P6", "after", "reply write"),
    ("coordinator/transport.py", "async for reply in call:", "R0", "after", "over loopback into the coordinator"),
    ("coordinator/router.py", "ms = (time.perf_counter() - started)", "D3", "before", "wake the waiting call"),
    ("coordinator/router.py", "self.stats.peer_compute_ms.append(", "D4", "before", "open the answer"),
    ("coordinator/router.py", "return DispatchResult(", "D5", "before", "bookkeeping, scatter into place"),
    ("coordinator/remote_moe.py", "if not result.complete:", "M2", "before", "hand-back to the caller's thread"),
]
END_STAGE = "combine with the gate weights"  # M2 -> M3, the caller's own timestamp after the call


def instrument(dest: Path) -> None:
    """Copy the packages to `dest` and insert the points."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "protos" / "_timeline.py").write_text(TRACE_MODULE)
    by_file: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    for path, anchor, point, where, _ in POINTS:
        by_file[path].append((anchor, point, where))
    for path, points in by_file.items():
        lines = (dest / path).read_text().splitlines()
        for anchor, point, where in points:
            found = [i for i, line in enumerate(lines) if line.strip().startswith(anchor)]
            if len(found) != 1:
                raise SystemExit(f"{path}: expected one line starting {anchor!r}, found {len(found)}: update POINTS")
            i = found[0]
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            if where == "after" and anchor.endswith(":"):
                indent += "    "  # first statement of the block it opens
            lines.insert(i + (where == "after"), f"{indent}_timeline.mark({point!r})")
        first = next(i for i, line in enumerate(lines) if line.startswith("from __future__"))
        lines.insert(first + 1, "from protos import _timeline")
        (dest / path).write_text("\n".join(lines) + "\n")


def worker(args: argparse.Namespace) -> None:
    """Run the layer calls on the instrumented copy (this process's PYTHONPATH)."""
    from ab_layer import one_peer_layer  # the same workload as the A/B script, next to this one

    from protos import _timeline

    with one_peer_layer(args.experts, args.k, args.hidden, args.tokens) as (_, layer, x):
        time.sleep(0.5)
        for _ in range(args.calls):
            _timeline.mark("M0")
            layer(x)
            _timeline.mark("M3")


def stages(trace_dir: Path) -> tuple[dict[tuple[str, str], list[float]], int]:
    """Per stage (point, next point): microseconds of every call that took the usual path."""
    events = []
    for f in trace_dir.glob("*.txt"):
        for line in f.read_text().splitlines():
            name, t = line.split()
            events.append((int(t), name))
    events.sort()
    calls: list[list[tuple[int, str]]] = []
    for t, name in events:
        if name == "M0":
            calls.append([])
        if calls:
            calls[-1].append((t, name))
    paths = collections.Counter(tuple(n for _, n in c) for c in calls)
    usual = paths.most_common(1)[0][0]
    out: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for c in calls:
        if tuple(n for _, n in c) == usual:
            for (t1, a), (t2, b) in itertools.pairwise(c):
                out[(a, b)].append((t2 - t1) / 1e3)
            out[("M0", "M3")].append((c[-1][0] - c[0][0]) / 1e3)
    return out, len(calls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="moe-timeline-") as tmp:
        tree, trace_dir = Path(tmp) / "tree", Path(tmp) / "trace"
        trace_dir.mkdir()
        instrument(tree)
        env = {**os.environ, "PYTHONPATH": str(tree), "MOE_TIMELINE_DIR": str(trace_dir)}
        shape = ["--experts", str(args.experts), "--k", str(args.k), "--hidden", str(args.hidden)]
        command = [sys.executable, __file__, "--worker", *shape, "--tokens", str(args.tokens)]
        subprocess.run([*command, "--calls", str(args.calls)], env=env, cwd=tmp, check=True)
        measured, calls = stages(trace_dir)
    what = {point: text for _, _, point, _, text in POINTS}
    what["M3"] = END_STAGE
    total = measured.pop(("M0", "M3"))
    print(f"{len(total)} of {calls} calls took the usual path; median of each stage (us):")
    for (a, b), values in measured.items():
        print(f"  {a}->{b}  {statistics.median(values):8.1f}  {what[b]}")
    print(f"  whole call {statistics.median(total):8.1f}")


if __name__ == "__main__":
    main()
