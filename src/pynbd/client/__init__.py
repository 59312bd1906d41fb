"""The NBD client: an asyncio engine (:class:`AsyncClient`), a blocking facade
(:class:`Client`) and multi-conn pools (:func:`connect` with ``connections=N``).

The names are loaded on first use, so that :mod:`pynbd.client.blocking` (one connection in
blocking calls, no event loop) can be imported without asyncio."""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from typing import Any

    from pynbd.client.engine import AsyncClient, ExportInfo
    from pynbd.client.pool import AsyncPool, connect
    from pynbd.client.sync import Client

__all__ = ["AsyncClient", "AsyncPool", "Client", "ExportInfo", "connect"]

_WHERE = {"AsyncClient": "engine", "ExportInfo": "negotiate", "AsyncPool": "pool",
          "connect": "pool", "Client": "sync"}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'pynbd.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pynbd.client.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
