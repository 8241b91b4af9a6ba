"""A background uvloop thread: torch modules call synchronously, RPCs run concurrently on it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch
import uvloop

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "moe-swarm-io") -> None:
        self.loop = uvloop.new_event_loop()
        # OpenMP thread counts are per thread: without this the loop thread's tensor work
        # (gather, encode, scatter) would use the default pool and spin against the caller's
        self._torch_threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        torch.set_num_threads(self._torch_threads)
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and wait for its result from the calling thread."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called from its own loop: await the coroutine instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()
