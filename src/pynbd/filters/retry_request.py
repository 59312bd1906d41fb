"""The retry-request filter: retry a failed request. Its manual page is
:class:`RetryRequestFilter`'s docstring."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pynbd.errors import ConfigError
from pynbd.filters._behaviour_common import sleep
from pynbd.filters._params import parse_bool, parse_unsigned
from pynbd.plugin import Filter

__all__ = ["RetryRequestFilter"]

log = logging.getLogger("pynbd.filters.retry-request")

#: The most retries allowed (nbdkit's limit).
MAX_RETRIES = 1000


class RetryRequestFilter(Filter):
    """NAME
        retry-request - pynbd retry-request filter: retry single requests that fail

    SYNOPSIS
        pynbd serve --filter=retry-request PLUGIN [retry-request-retries=N]
                    [retry-request-delay=N] [retry-request-open=false] [PLUGIN-ARGS...]

    DESCRIPTION
        retry-request tries a failed request again, after a wait, a few times before it
        gives up. For plugins that are not quite reliable or behave at random: a curl
        plugin behind a load balancer that now and then sends it to a server that does not
        answer.

        The retry filter is the heavier alternative: it reopens the plugin before every
        retry.

        A wait ends early when the server shuts down.

        This is nbdkit-retry-request-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        retry-request-retries=N
            How many times a request is retried before it fails (at most 1000). Default 2;
            0 turns the filter off.

        retry-request-delay=N
            Seconds to wait before a retry (at least 1). Default 2.

        retry-request-open=false
            Do not retry opening the plugin. By default a failed open is retried like any
            other request.

    EXAMPLES
        Retry reads of a flaky web server three times, a second apart:

            pynbd serve --filter=retry-request curl https://example.com/disk.img \\
                retry-request-retries=3 retry-request-delay=1
    """

    name = "retry-request"
    config_help = (
        "retry-request-retries=<N> Number of retries (default: 2).\n"
        "retry-request-delay=<N>   Seconds to wait before retry (default: 2).\n"
        "retry-request-open=false  Do not retry opening the plugin (default: true).")

    def __init__(self) -> None:
        self.retries = 2
        self.delay = 2
        self.retry_open = True

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "retry-request-retries":
            self.retries = parse_unsigned("retry-request-retries", value)
            if self.retries > MAX_RETRIES:
                raise ConfigError("retry-request-retries: value too large")
        elif key == "retry-request-delay":
            self.delay = parse_unsigned("retry-request-delay", value)
            if self.delay == 0:
                raise ConfigError("retry-request-delay cannot be 0")
        elif key == "retry-request-open":
            self.retry_open = parse_bool(value)
        else:
            next_config(key, value)

    def _run(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, tried again up to ``retries`` times while it fails; the last
        failure is the request's (also when the server shuts down during a wait)."""
        failure: Exception | None = None
        for i in range(self.retries + 1):
            if failure is not None:
                log.debug("retry %u: waiting %u seconds before retrying", i, self.delay)
                if not sleep(self.delay):
                    break
            try:
                return call(*args)
            except Exception as e:  # noqa: BLE001 - any failure is retried, as in nbdkit
                failure = e
        assert failure is not None
        raise failure

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        if self.retry_open:
            self._run(next_open, readonly, export_name)
        else:
            next_open(readonly, export_name)
        return None

    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        return self._run(next.pread, count, offset, flags)

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        self._run(next.pwrite, buf, offset, flags)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._run(next.trim, count, offset, flags)

    def flush(self, next: Any, h: Any, flags: int) -> None:
        self._run(next.flush, flags)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._run(next.zero, count, offset, flags)

    def extents(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        return self._run(next.extents, count, offset, flags)

    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        self._run(next.cache, count, offset, flags)
