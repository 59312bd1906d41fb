"""Worker threads for one connection's blocking requests."""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Workers"]


class Workers:
    """Up to ``nthreads`` threads running one connection's blocking requests.

    Cheaper than an executor per request: jobs go through a SimpleQueue, results come back
    through a deque, and the event loop is woken once per batch of results (one self-pipe
    write), not once per request. A thread is started only when every running one is busy,
    so a connection that never has many requests in flight never pays for ``nthreads``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, nthreads: int, name: str,
                 run: Callable[[Any, tuple[Any, ...]], Any],
                 on_results: Callable[[list[tuple[Any, bool, Any]]], None]) -> None:
        self.loop = loop
        self.max = nthreads
        self.name = name
        self.run = run  # run(fn, args) in a worker: the thread model's locks, then fn
        self.on_results = on_results  # on the loop: called with a list of (job, ok, value)
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.results: collections.deque[Any] = collections.deque()
        self.threads: list[threading.Thread] = []
        self.busy = 0  # jobs submitted whose results were not yet handed back (loop only)
        self.woken = False

    def submit(self, job: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Queue ``fn(*args)``; its result comes back to ``on_results`` with ``job``."""
        if self.busy >= len(self.threads) and len(self.threads) < self.max:
            t = threading.Thread(target=self._work, name=f"{self.name}-{len(self.threads)}",
                                 daemon=True)
            self.threads.append(t)
            t.start()
        self.busy += 1
        self.jobs.put((job, fn, args))

    def _work(self) -> None:
        get = self.jobs.get
        results = self.results
        run = self.run
        while True:
            item = get()
            if item is None:
                return
            job, fn, args = item
            try:
                results.append((job, True, run(fn, args)))
            except BaseException as e:  # noqa: BLE001 - handed to the loop as the result
                results.append((job, False, e))
            if not self.woken:
                self.woken = True
                try:
                    self.loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the loop is closed: nobody waits for the result
                    return

    def _drain(self) -> None:
        self.woken = False
        results = self.results
        batch = []
        while results:
            batch.append(results.popleft())
        if batch:
            self.busy -= len(batch)
            self.on_results(batch)

    def stop(self) -> None:
        """Stop the threads once queued jobs are done (blocking: call it off the loop)."""
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()
