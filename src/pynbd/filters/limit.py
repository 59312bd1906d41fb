"""The limit filter: limit how many clients may be connected at once. Its manual page is
:class:`LimitFilter`'s docstring."""

from __future__ import annotations

import errno
import threading
from typing import Any

from pynbd.errors import CommandError
from pynbd.filters._params import parse_unsigned
from pynbd.plugin import Filter

__all__ = ["LimitFilter"]

_TOO_MANY = "limit: too many clients connected, connection rejected"


class LimitFilter(Filter):
    """NAME
        limit - pynbd limit filter: limit the number of clients connected at once

    SYNOPSIS
        pynbd serve --filter=limit PLUGIN [limit=N] [PLUGIN-ARGS...]

    DESCRIPTION
        limit refuses a client when limit=N clients (by default 1) are already connected.

        A client is refused as soon as it connects, before it negotiates (and before any
        TLS), when the limit is reached; it is counted from the moment it opens an export,
        and the limit is checked again then, so that a client cannot get past it by
        negotiating slowly.

        This is nbdkit-limit-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        limit=N
            At most N clients at once. Default 1; 0 means no limit (the filter does
            nothing).

    EXAMPLES
        One client at a time, the next ones refused:

            pynbd serve --filter=limit file disk.img

        At most ten clients:

            pynbd serve --filter=limit file disk.img limit=10
    """

    name = "limit"
    nonblocking = True

    def __init__(self) -> None:
        self.limit = 1
        self.connections = 0
        self._lock = threading.Lock()

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "limit":
            self.limit = parse_unsigned("limit", value)
        else:
            next_config(key, value)

    def _full(self) -> bool:
        return self.limit > 0 and self.connections >= self.limit

    def preconnect(self, next_preconnect: Any, readonly: bool) -> None:
        next_preconnect(readonly)
        with self._lock:
            if self._full():
                raise CommandError(errno.EBUSY, _TOO_MANY)

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(readonly, export_name)
        with self._lock:
            # Again: a client negotiating slowly could otherwise get past the limit.
            if self._full():
                raise CommandError(errno.EBUSY, _TOO_MANY)
            self.connections += 1
        return None

    def close(self, h: Any) -> None:
        with self._lock:
            self.connections -= 1
