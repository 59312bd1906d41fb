"""The noparallel filter: serialize requests or connections. Its manual page is
:class:`NoparallelFilter`'s docstring."""

from __future__ import annotations

from typing import Any

from pynbd.errors import ConfigError
from pynbd.plugin import Filter, ThreadModel

__all__ = ["NoparallelFilter"]

_MODES = {
    "requests": ThreadModel.SERIALIZE_REQUESTS,
    "all-requests": ThreadModel.SERIALIZE_ALL_REQUESTS,
    "all_requests": ThreadModel.SERIALIZE_ALL_REQUESTS,
    "connections": ThreadModel.SERIALIZE_CONNECTIONS,
}


class NoparallelFilter(Filter):
    """NAME
        noparallel - pynbd noparallel filter: serialize requests or connections

    SYNOPSIS
        pynbd serve --filter=noparallel PLUGIN [serialize=MODE] [PLUGIN-ARGS...]

    DESCRIPTION
        noparallel deliberately takes away parallelism in the handling of requests, by
        making the server's thread model stricter. Useful to compare timings between levels
        of parallelism, to work around a plugin that claims more parallelism than it can
        take, or for a client that sends several requests at once but cannot cope with
        answers out of order.

        To limit the number of clients, the limit filter is usually the better tool.

        This is nbdkit-noparallel-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        serialize=requests
            One request at a time per connection; other connections still run in parallel
            (when the plugin allows). The default.

        serialize=all-requests
            One request at a time over all connections; several clients may still be
            connected at once.

        serialize=connections
            One client at a time; multi-conn is then no longer advertised.

        (serialise= is the same parameter.)

    EXAMPLES
        Answer each client's requests in order:

            pynbd serve --filter=noparallel file disk.img

        One client at a time:

            pynbd serve --filter=noparallel file serialize=connections disk.img
    """

    name = "noparallel"
    nonblocking = True
    config_help = ("serialize=<MODE>      'requests' (default), 'all-requests', or "
                   "'connections'.")

    def __init__(self) -> None:
        self.model = ThreadModel.SERIALIZE_REQUESTS

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key not in ("serialize", "serialise"):
            next_config(key, value)
        elif value not in _MODES:
            raise ConfigError(f"unknown noparallel serialize mode '{value}'")
        else:
            self.model = _MODES[value]

    def get_thread_model(self) -> ThreadModel:
        return self.model
