"""A thin blocking facade over :class:`~pynbd.client.engine.AsyncClient`.

Each method runs the engine's coroutine on a private event loop thread and waits for it:
one implementation, two faces.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

from pynbd.client.engine import AsyncClient

__all__ = ["Client", "LoopThread"]

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread, for blocking callers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pynbd-client",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    def call(self, fn: Any, *args: Any) -> Any:
        async def f() -> Any:
            return fn(*args)

        return self.run(f())

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.loop.close()


class Client:
    """Blocking NBD client: ``Client.connect(uri)`` then ``pread``, ``pwrite``..."""

    def __init__(self, engine: AsyncClient, lt: LoopThread) -> None:
        self._c = engine
        self._lt = lt

    @classmethod
    def connect(cls, uri: str | None = None, **kw: Any) -> Client:
        lt = LoopThread()
        try:
            engine = lt.run(AsyncClient.connect(uri, **kw))
        except BaseException:
            lt.stop()
            raise
        return cls(engine, lt)

    @property
    def engine(self) -> AsyncClient:
        return self._c

    def __setattr__(self, name: str, value: Any) -> None:
        # c.request_timeout = 5, c.strict = False ... set the engine's attribute
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._c, name, value)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._c, name)
        if asyncio.iscoroutinefunction(attr):
            def call(*args: Any, **kw: Any) -> Any:
                return self._lt.run(attr(*args, **kw))

            call.__name__ = name
            call.__doc__ = attr.__doc__
            return call
        return attr

    def close(self) -> None:
        if self._lt.loop.is_closed():
            return
        try:
            self._lt.run(self._c.close())
        finally:
            self._lt.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
