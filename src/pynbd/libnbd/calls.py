"""How every call of a handle is made, as libnbd's generated wrappers make it: the
closed-handle check, the handle's lock held for the whole call, the permitted-state check,
the error context ``nbd_<call>`` and the debug trace; and :class:`Handle`, what the parts of
:class:`pynbd.libnbd.NBD` (settings, connecting, options, commands) share."""

from __future__ import annotations

import errno as _errno
import functools
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pynbd.libnbd.callbacks import call, index, render, u32
from pynbd.libnbd.errors import ClosedHandle, Error, mkerr
from pynbd.libnbd.states import CREATED, READY, STATE_DESC, STATE_TEXT

if TYPE_CHECKING:
    from pynbd.client.strict import StrictRules
    from pynbd.libnbd.driver import Driver
    from pynbd.libnbd.engine import Engine, Stats

__all__ = ["Handle", "api"]

_F = TypeVar("_F", bound=Callable[..., Any])


class Handle:
    """The state every part of a handle reads and writes (set in ``NBD.__init__``)."""

    _gone: bool
    _lock: threading.RLock
    _ctx: str
    _name: str
    _debug_on: bool
    _debug_cb: Callable[..., Any] | None
    _state: str
    _eng: Engine | None
    _driver: Driver
    _stats: Stats
    _info: Any
    _contexts: set[str]
    _rules: StrictRules | None
    _disconnecting: bool
    _connecting: Engine | None
    _pending_opt: Any
    _phase: list[str]
    _export_name: str
    _strict: int
    _meta: list[str]
    _opt_mode: bool
    _full_info: bool
    _request_bs: bool
    _request_sr: bool
    _hflags: int
    _pread_init: bool
    _uri: dict[str, Any] | None
    _tls: int
    _tls_username: str | None
    _tls_certs: str | None
    _tls_psk: str | None
    _tls_hostname: str | None
    _allow_transports: int
    _allow_tls: int
    _allow_local_file: bool

    def _err(self, msg: str, errnum: int = 0) -> Error:
        return mkerr(self._ctx, msg, errnum)

    def _debug_msg(self, msg: str) -> None:
        cb = self._debug_cb
        if cb is not None:
            call(cb, self._ctx, msg)
        else:
            sys.stderr.write(f"libnbd: debug: {self._name}: {self._ctx}: {msg}\n")
            sys.stderr.flush()

    def _trace_enter(self, fn: Callable[..., Any], args: tuple[Any, ...],
                     kw: dict[str, Any]) -> None:
        import inspect

        try:
            bound = inspect.signature(fn).bind(self, *args, **kw)
            bound.apply_defaults()
            parts = [f"{k}={render(v)}" for k, v in list(bound.arguments.items())[1:]]
        except TypeError:
            parts = []
        self._debug_msg("enter: " + " ".join(parts) if parts else "enter:")

    def _refresh(self) -> str:
        """The state as libnbd knows it: a handle learns that the server hung up only when
        it reads, inside one of its calls."""
        return self._state

    def _became_ready(self) -> None:
        """In transmission: what the export is, as the server said."""
        eng = self._eng
        assert eng is not None
        self._state = READY
        self._info = eng.export
        self._rules = None
        self._contexts = set(eng.meta_contexts.values()) \
            if (eng.structured and eng.protocol != "oldstyle") else set()

    def _run_until(self, pred: Callable[[], bool]) -> None:
        """Make progress in this call, waiting as long as it takes, until ``pred()`` (a
        blocking call's wait)."""
        while not pred():
            if not self._driver.step(None) and not pred():
                raise self._err("the connection has nothing left to wait for", _errno.ENOTCONN)

    def _check_state(self, allowed: frozenset[str]) -> None:
        st = self._refresh()
        if st not in allowed:
            want = ", or ".join(d for s, d in STATE_DESC if s in allowed)
            raise self._err(f"invalid state: {STATE_TEXT[st][0]}: the handle must be {want}",
                            _errno.ENOTCONN if st == CREATED else _errno.EINVAL)

    def _check_flags(self, name: str, value: int, mask: int, what: str = "flags") -> int:
        value = u32(value)
        if value & ~mask:
            raise self._err(f"{what}: invalid value for flag: 0x{value:x}", _errno.EINVAL)
        return value

    def _check_enum(self, value: Any, top: int, what: str) -> int:
        v = index(value)
        if not 0 <= v <= top:
            raise self._err(f"{what}: invalid value for parameter: {v}", _errno.EINVAL)
        return v


def api(states: frozenset[str] | None = None) -> Callable[[_F], _F]:
    """Wrap a call: the closed-handle check, the handle lock, the permitted-state check,
    error context ``nbd_<call>`` and the debug trace."""

    def deco(fn: _F) -> _F:
        ctx = "nbd_" + fn.__name__

        @functools.wraps(fn)
        def wrapper(self: Handle, *args: Any, **kw: Any) -> Any:
            if self._gone:
                raise ClosedHandle("NBD handle is closed")
            with self._lock:
                outer, self._ctx = self._ctx, ctx
                try:
                    if self._debug_on:
                        self._trace_enter(fn, args, kw)
                    try:
                        if states is not None and self._refresh() not in states:
                            self._check_state(states)  # raises
                        r = fn(self, *args, **kw)
                    except Error as e:
                        if self._debug_on:
                            self._debug_msg(f'leave: error="{e.string}"')
                        # Raised from the call itself, as from libnbd's C code: no internal
                        # frames or chained exceptions in the traceback.
                        e.__cause__ = None
                        e.__suppress_context__ = True
                        raise e.with_traceback(None) from None
                    if self._debug_on:
                        self._debug_msg(f"leave: ret={render(r, True)}")
                    return r
                finally:
                    self._ctx = outer

        return wrapper  # type: ignore[return-value]

    return deco
