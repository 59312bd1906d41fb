"""Option negotiation in option mode: ``opt_go``, ``opt_info``, ``opt_list``,
``opt_list_meta_context``, ``opt_abort`` and their ``aio_`` forms. Each sends its option in
the call and makes the rest of its progress in the calls that follow (``poll()``, or the
call itself when it blocks); its result is processed there, in the caller's thread."""

from __future__ import annotations

import ctypes
import errno as _errno
from collections.abc import Callable
from typing import Any

from pynbd.errors import OptionError, ProtocolError
from pynbd.libnbd.callbacks import call
from pynbd.libnbd.calls import Handle, api
from pynbd.libnbd.engine import Engine
from pynbd.libnbd.errors import failure_text, option_errno
from pynbd.libnbd.states import CLOSED, CONNECTING, DEAD, NEGOTIATING, ST_NEG
from pynbd.protocol.client import ExportSizeError
from pynbd.protocol.constants import Opt

__all__ = ["Options"]


async def _abort(eng: Engine) -> None:
    """NBD_OPT_ABORT (its reply, if any, read), then the hang-up."""
    try:
        await eng._option(Opt.ABORT)
    except (ProtocolError, ConnectionError, OSError):
        pass
    eng.hang_up()
    eng.reap()


class Options(Handle):
    """The option-mode calls of :class:`pynbd.libnbd.NBD`."""

    def _opt_prepare(self) -> Engine:
        eng = self._eng
        assert eng is not None
        eng.full_info = self._full_info
        eng.request_block_size = self._request_bs
        return eng

    async def _opt_go_or_info(self, go: bool) -> Any:
        eng = self._opt_prepare()
        name = self._export_name
        if (eng.structured or eng.extended) and self._meta:
            try:
                await eng.opt_set_meta_context(list(self._meta), name)
            except OptionError:
                eng.meta_contexts = {}
        if go:
            if eng.protocol == "newstyle":
                await eng.lib_export_name(name)
            else:
                await eng.opt_go(name)
            return None
        return await eng.opt_info(name)

    def _start_opt(self, kind: str, coro: Any, done: Callable[[Any, int], None],
                   completion: Callable[..., Any] | None) -> None:
        self._state = CONNECTING
        self._pending_opt = kind

        def then(result: Any, exc: BaseException | None) -> None:
            self._pending_opt = None
            err = 0
            if exc is None:
                done(result, 0)
            elif isinstance(exc, OptionError):
                err = option_errno(exc, kind)
                done(None, err)
            elif isinstance(exc, ExportSizeError) and kind == "info":
                # The server's replies were well-formed: negotiation goes on (another export
                # may be fine), but this one is refused, with its own message.
                self._state = NEGOTIATING
                self._info = None
                if completion is not None:
                    call(completion, ctypes.c_int(exc.errno))
                raise self._err(str(exc), exc.errno)
            else:
                self._state = DEAD
                msg, err = failure_text(exc)
                if completion is not None:
                    call(completion, ctypes.c_int(err or _errno.ENOTCONN))
                raise self._err(msg, err)
            if completion is not None:
                call(completion, ctypes.c_int(err))

        self._driver.start(coro, then)
        self._driver.resume(defer=True)

    def _go_done(self, result: Any, err: int) -> None:
        if err:
            self._state = NEGOTIATING
            self._info = None
            return
        self._became_ready()

    def _info_done(self, result: Any, err: int) -> None:
        self._state = NEGOTIATING
        if err:
            self._info = None  # 1.14: a failed opt_info forgets what an earlier one learned
            return
        eng = self._eng
        assert eng is not None
        self._info = result
        self._contexts = set(eng.meta_contexts.values()) if eng.structured else set()

    def _opt_blocking(self, kind: str, coro: Any, done: Callable[[Any, int], None],
                      what: str) -> Any:
        box: dict[str, Any] = {}

        def record(result: Any, err: int) -> None:
            box["r"], box["err"] = result, err
            done(result, err)

        self._start_opt(kind, coro, record, None)
        self._run_until(lambda: self._pending_opt is None)
        if box.get("err"):
            raise self._err(f"server replied with error to {what} request", box["err"])
        return box.get("r")

    def _need_fixed(self) -> None:
        eng = self._eng
        if eng is None or eng.protocol != "newstyle-fixed":
            raise self._err("server is not using fixed newstyle protocol", _errno.ENOTSUP)

    @api(ST_NEG)
    def opt_go(self) -> None:
        """NBD_OPT_GO for the current export name; enters transmission."""
        self._opt_blocking("go", self._opt_go_or_info(True), self._go_done, "opt_go")

    @api(ST_NEG)
    def aio_opt_go(self, completion: Callable[..., Any] | None = None) -> None:
        self._start_opt("go", self._opt_go_or_info(True), self._go_done, completion)

    @api(ST_NEG)
    def opt_info(self) -> None:
        """NBD_OPT_INFO: learn size, flags and contexts while staying in negotiation."""
        self._need_fixed()
        self._opt_blocking("info", self._opt_go_or_info(False), self._info_done, "opt_info")

    @api(ST_NEG)
    def aio_opt_info(self, completion: Callable[..., Any] | None = None) -> None:
        self._need_fixed()
        self._start_opt("info", self._opt_go_or_info(False), self._info_done, completion)

    def _abort_done(self, result: Any, err: int) -> None:
        self._state = CLOSED
        self._info = None

    def _abort_plain(self) -> bool:
        """A plain newstyle server has no NBD_OPT_ABORT: libnbd just drops the connection
        (DEAD) and the call succeeds."""
        eng = self._eng
        assert eng is not None
        if eng.protocol == "newstyle-fixed":
            return False
        self._state = DEAD
        self._info = None
        eng.hang_up()
        eng.reap()
        return True

    @api(ST_NEG)
    def opt_abort(self) -> None:
        """NBD_OPT_ABORT; the handle is closed afterwards."""
        eng = self._eng
        assert eng is not None
        if self._abort_plain():
            return
        self._disconnecting = True
        self._opt_blocking("abort", _abort(eng), self._abort_done, "opt_abort")

    @api(ST_NEG)
    def aio_opt_abort(self) -> None:
        eng = self._eng
        assert eng is not None
        if self._abort_plain():
            return
        self._disconnecting = True
        self._start_opt("abort", _abort(eng), self._abort_done, None)

    def _list_done(self, cb: Callable[..., Any], box: dict[str, Any]) -> Callable[[Any, int], None]:
        def done(result: Any, err: int) -> None:
            self._state = NEGOTIATING
            if not err:
                for name, desc in result:
                    call(cb, name, desc)
                box["count"] = len(result)
        return done

    @api(ST_NEG)
    def opt_list(self, list: Callable[[str, str], Any]) -> int:
        """NBD_OPT_LIST: ``list(name, description)`` per export; returns the count."""
        self._need_fixed()
        eng = self._eng
        assert eng is not None
        box: dict[str, Any] = {}
        self._opt_blocking("list", eng.opt_list(), self._list_done(list, box), "list")
        return int(box.get("count", 0))

    @api(ST_NEG)
    def aio_opt_list(self, list: Callable[[str, str], Any],
                     completion: Callable[..., Any] | None = None) -> None:
        self._need_fixed()
        eng = self._eng
        assert eng is not None
        self._start_opt("list", eng.opt_list(), self._list_done(list, {}), completion)

    def _meta_list_start(self) -> Any:
        self._need_fixed()
        eng = self._eng
        assert eng is not None
        if not eng.structured:
            raise self._err("server lacks structured replies", _errno.ENOTSUP)
        return eng.opt_list_meta_context(list(self._meta), self._export_name)

    def _ctx_done(self, cb: Callable[..., Any], box: dict[str, Any]) -> Callable[[Any, int], None]:
        def done(result: Any, err: int) -> None:
            self._state = NEGOTIATING
            if not err:
                for name in result:
                    call(cb, name)
                box["count"] = len(result)
        return done

    @api(ST_NEG)
    def opt_list_meta_context(self, context: Callable[[str], Any]) -> int:
        """NBD_OPT_LIST_META_CONTEXT for the add_meta_context list; ``context(name)`` per
        reply; returns the count."""
        box: dict[str, Any] = {}
        self._opt_blocking("list_meta", self._meta_list_start(), self._ctx_done(context, box),
                           "list meta context")
        return int(box.get("count", 0))

    @api(ST_NEG)
    def aio_opt_list_meta_context(self, context: Callable[[str], Any],
                                  completion: Callable[..., Any] | None = None) -> int:
        self._start_opt("list_meta", self._meta_list_start(), self._ctx_done(context, {}),
                        completion)
        return 0
