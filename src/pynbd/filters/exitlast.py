"""The exitlast filter: exit when the last client disconnects. Its manual page is
:class:`ExitlastFilter`'s docstring."""

from __future__ import annotations

import logging
import threading
from typing import Any

from pynbd.plugin import Filter, shutdown

__all__ = ["ExitlastFilter"]

log = logging.getLogger("pynbd.filters.exitlast")


class ExitlastFilter(Filter):
    """NAME
        exitlast - pynbd exitlast filter: exit when the last client disconnects

    SYNOPSIS
        pynbd serve --filter=exitlast PLUGIN [PLUGIN-ARGS...]

    DESCRIPTION
        exitlast makes the server exit when no client is connected any more. It does not
        exit before the first client.

        Clients are counted from the moment they open an export (NBD_OPT_GO, or
        NBD_OPT_INFO, which opens and closes it at once): a client that asks for
        information about an export and disconnects is a first and last client too.

        Useful under a superserver (socket activation), to give the resources back when
        nobody uses the server, or to make sure the server ends with its client (see also
        --run).

        To exit when some event happens, see the exitwhen filter.

        This is nbdkit-exitlast-filter(1) for pynbd.

    PARAMETERS
        None of its own: every parameter goes to the plugin.

    EXAMPLES
        Serve one client, then exit:

            pynbd serve --filter=exitlast memory 1G
    """

    name = "exitlast"
    nonblocking = True

    def __init__(self) -> None:
        self.connections = 0
        self._lock = threading.Lock()

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(readonly, export_name)
        with self._lock:
            self.connections += 1
        return None

    def close(self, h: Any) -> None:
        with self._lock:
            self.connections -= 1
            last = self.connections == 0
        if last:
            log.debug("exitlast: exiting on last client connection")
            shutdown()
