"""The NBD client: an asyncio engine (:class:`AsyncClient`) and a blocking facade (:class:`Client`)."""

from pynbd.client.engine import AsyncClient, ExportInfo
from pynbd.client.sync import Client

__all__ = ["AsyncClient", "Client", "ExportInfo"]
