"""The NBD client: an asyncio engine (:class:`AsyncClient`), a blocking facade
(:class:`Client`) and multi-conn pools (:func:`connect` with ``connections=N``)."""

from pynbd.client.engine import AsyncClient, ExportInfo
from pynbd.client.pool import AsyncPool, connect
from pynbd.client.sync import Client

__all__ = ["AsyncClient", "AsyncPool", "Client", "ExportInfo", "connect"]
