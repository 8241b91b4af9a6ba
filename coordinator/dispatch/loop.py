"""A background uvloop thread: torch modules call synchronously, RPCs run concurrently on it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch
import uvloop

T = TypeVar("T")
CLOSE_WAIT_S = 2.0  # how long close() lets cancelled work unwind


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
        """Run a coroutine on the loop and wait for its result from the calling thread.

        One lock carries the hand-back (a layer call's round trip is two thread wake-ups, and
        a concurrent.futures.Future adds a condition and a chained callback to each)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called from its own loop: await the coroutine instead")
        done = threading.Lock()
        done.acquire()
        started: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            started.append(task)
            task.add_done_callback(lambda _: done.release())

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop is closed
            coro.close()
            raise
        try:
            if not done.acquire(timeout=-1 if timeout is None else timeout):
                raise TimeoutError(f"gave up after {timeout} s")
        except BaseException:  # a timeout or Ctrl-C in the caller: the work it waited for stops too
            self.loop.call_soon_threadsafe(lambda: started and started[0].cancel())
            raise
        if started[0].cancelled():  # close() cancelled it: what a concurrent future would raise
            raise concurrent.futures.CancelledError()
        return started[0].result()

    async def _cancel_all(self) -> None:
        """Cancel what is still running (hedges, spot checks, a call the caller gave up on) and let
        it unwind, so nothing is destroyed pending or touches the loop after it is closed."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=CLOSE_WAIT_S) if tasks else None
        await self.loop.shutdown_asyncgens()

    def close(self) -> None:
        if self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._cancel_all(), self.loop).result(CLOSE_WAIT_S + 1)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()
