"""A layer that logs every call through the layer it wraps, as nbdkit's ``-v`` does.

``pynbd serve -v`` wraps each layer of the chain (the plugin and every filter) in one, so a
request shows once per layer it passes through::

    pynbd: debug: offset: pread count=512 offset=0
    pynbd: debug: memory: pread count=512 offset=4096

The line formats are nbdkit's (server/backend.c), so log readers written for nbdkit keep
working. Without ``-v`` no such layer exists: the hot path pays nothing for it.
"""

from __future__ import annotations

import logging
from typing import Any

from pynbd.errors import CommandError
from pynbd.server.backend import Layer

__all__ = ["DebugLayer"]

log = logging.getLogger("pynbd.server")

_FUA, _MAY_TRIM, _REQ_ONE, _FAST_ZERO = 2, 1, 4, 8


def _b(flags: int, bit: int) -> int:
    return 1 if flags & bit else 0


class DebugLayer(Layer):
    """Wraps a :class:`~pynbd.server.backend.Layer`; same interface, every call logged."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.nonblocking = inner.nonblocking
        self.thread_model = inner.thread_model
        #: ``-D nbdkit.backend.controlpath=0`` / ``datapath=0`` turn these off.
        self.controlpath = True
        self.datapath = True

    def __getattr__(self, name: str) -> Any:  # plugin, filter, below, has_async...
        return getattr(self.inner, name)

    def _run(self, what: str, fn: Any, *args: Any, data: bool = False) -> Any:
        if self.datapath if data else self.controlpath:
            log.debug("%s: %s", self.name, what)
        try:
            return fn(*args)
        except CommandError as e:
            log.debug("%s: %s failed: %s: %s", self.name, what.split(" ", 1)[0], e.errname,
                      e.message)
            raise
        except OSError as e:
            log.debug("%s: %s failed: %s", self.name, what.split(" ", 1)[0], e)
            raise

    def preconnect(self, readonly: bool) -> None:
        self._run("preconnect", self.inner.preconnect, readonly)

    def list_exports(self, readonly: bool, is_tls: bool) -> Any:
        return self._run(f"list_exports readonly={int(readonly)} tls={int(is_tls)}",
                         self.inner.list_exports, readonly, is_tls)

    def default_export(self, readonly: bool, is_tls: bool) -> Any:
        return self._run(f"default_export readonly={int(readonly)} tls={int(is_tls)}",
                         self.inner.default_export, readonly, is_tls)

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        return self._run(f'open readonly={int(readonly)} exportname="{export_name}" '
                         f"tls={int(is_tls)}", self.inner.open, readonly, export_name, is_tls)

    def prepare(self, h: Any, readonly: bool) -> None:
        self._run(f"prepare readonly={int(readonly)}", self.inner.prepare, h, readonly)

    def below_context(self, h: Any) -> Any:
        return self.inner.below_context(h)

    def finalize(self, h: Any) -> None:
        self._run("finalize", self.inner.finalize, h)

    def close(self, h: Any) -> None:
        self._run("close", self.inner.close, h)

    def query(self, h: Any, what: str) -> Any:
        return self._run(what, self.inner.query, h, what)

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        return self._run(f"pread count={count} offset={offset}", self.inner.pread, h, count,
                         offset, flags, data=True)

    def pwrite(self, h: Any, buf: Any, offset: int, flags: int) -> None:
        self._run(f"pwrite count={len(buf)} offset={offset} fua={_b(flags, _FUA)}",
                  self.inner.pwrite, h, buf, offset, flags, data=True)

    def flush(self, h: Any, flags: int) -> None:
        self._run("flush", self.inner.flush, h, flags, data=True)

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._run(f"trim count={count} offset={offset} fua={_b(flags, _FUA)}",
                  self.inner.trim, h, count, offset, flags, data=True)

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._run(f"zero count={count} offset={offset} may_trim={_b(flags, _MAY_TRIM)} "
                  f"fua={_b(flags, _FUA)} fast={_b(flags, _FAST_ZERO)}",
                  self.inner.zero, h, count, offset, flags, data=True)

    def extents(self, h: Any, count: int, offset: int, flags: int) -> Any:
        return self._run(f"extents count={count} offset={offset} "
                         f"req_one={_b(flags, _REQ_ONE)}", self.inner.extents, h, count,
                         offset, flags, data=True)

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._run(f"cache count={count} offset={offset}", self.inner.cache, h, count, offset,
                  flags, data=True)
