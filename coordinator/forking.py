"""Forking safely from a process that has used gRPC.

hivemind starts each DHT node by fork(). The child inherits every Python object of the
parent, garbage included. If the child's garbage collector frees an inherited grpc.aio
object (a closed channel's or stream's call still in a reference cycle), its finaliser
calls into a gRPC core whose threads exist only in the parent: the child spins forever
(seen: `gc_collect_main -> cygrpc -> Thread.join`) or crashes. So the collector is off
from just before the fork until the child has moved everything it inherited to the
generation that is never collected (`gc.freeze()`); both processes then collect their own
new garbage as usual.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

# while a fork_safe_gc() block runs: whether its forked children turn the collector back on
# once they have frozen what they inherited (None: not forking from such a block)
_child_gc: bool | None = None


def _after_fork_in_child() -> None:
    if _child_gc is not None:
        gc.freeze()
        if _child_gc:
            gc.enable()


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def fork_safe_gc() -> Iterator[None]:
    """Around code that forks (a hivemind DHT start) in a process that has used gRPC."""
    global _child_gc
    enabled = gc.isenabled()
    gc.disable()  # also in the child until its at-fork hook has frozen what it inherited
    _child_gc = enabled
    try:
        yield
    finally:
        _child_gc = None
        if enabled:
            gc.enable()
