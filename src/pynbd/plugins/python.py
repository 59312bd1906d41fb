"""The python plugin: nbdkit's Python plugin API. Its manual page is :class:`PythonPlugin`'s
docstring; the ``nbdkit`` module scripts import is :mod:`pynbd.plugins._nbdkit_module`."""

from __future__ import annotations

import ast
import builtins
import contextlib
import errno
import io
import logging
import operator
import platform
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any

from pynbd import __version__
from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import (
    CALLBACKS,
    CacheMode,
    Flag,
    FuaMode,
    Plugin,
    ThreadModel,
    connection,
)
from pynbd.plugins import _nbdkit_module as nbdkit
from pynbd.plugins._python_pure import Pure, analyse

__all__ = ["PythonPlugin", "is_nbdkit_script"]

log = logging.getLogger("pynbd.plugins.python")
#: set_error's per-thread state (``_tls.error``), shared with the nbdkit module.
_tls = nbdkit._tls

#: The newest nbdkit Python API version (``API_VERSION`` in a script) this plugin runs.
MAX_API_VERSION = 2
#: What ``--help`` shows for the plugin's own parameters (nbdkit's text).
_CONFIG_HELP = ("script=<FILENAME>     (required) The Python plugin to run.\n"
                "[other arguments may be used by the plugin that you load]")
_MAY_TRIM = int(Flag.MAY_TRIM)
_NOTSUP = (errno.EOPNOTSUPP, errno.ENOTSUP)
#: What a script's callback may raise and the plugin turns into an error (any exception,
#: and sys.exit(), as nbdkit's PyErr_Occurred catches; KeyboardInterrupt still stops us).
_SCRIPT_ERRORS = (Exception, SystemExit)
#: The callbacks that may run for a connection: all must be pure (never block) for the
#: plugin to say it is nonblocking.
_CONNECTION_CALLBACKS = ("preconnect", "list_exports", "default_export", "open", "close",
                         "export_description", "get_size", "block_size", "can_write",
                         "can_flush", "is_rotational", "can_trim", "can_zero", "can_fast_zero",
                         "can_extents", "can_fua", "can_multi_conn", "can_cache", "pread",
                         "pwrite", "flush", "trim", "zero", "extents", "cache")


class _Handle:
    """A connection's handle: the script's own handle and can_zero's cached answer."""

    __slots__ = ("can_zero", "h")

    def __init__(self, h: Any) -> None:
        self.h = h
        self.can_zero: bool | None = None


def _describe(e: BaseException) -> str:
    """An exception in one line: ``RuntimeError: message``."""
    text = str(e)
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class PythonPlugin(Plugin):
    """NAME
        python - pynbd plugin for scripts written against nbdkit's Python API

    SYNOPSIS
        pynbd serve python /path/to/plugin.py [KEY=VALUE ...]

    DESCRIPTION
        python runs plugins written for nbdkit-python-plugin(3) unchanged: a Python file
        defining module-level functions named after nbdkit's callbacks. At least open,
        get_size and pread are required:

            API_VERSION = 2
            def open(readonly): return 1
            def get_size(h): return 1024 * 1024
            def pread(h, buf, offset, flags): buf[:] = bytes(len(buf))

        The script runs at configuration time, as the "__main__" module (__name__ is
        "__main__" and __file__ is its path), so top-level code runs once, when the plugin
        loads. "import nbdkit" gives the nbdkit module: debug, export_name, set_error,
        parse_size, shutdown and the constants THREAD_MODEL_*, FLAG_*, FUA_*, CACHE_*,
        EXTENT_*, as in nbdkit 1.32, plus disconnect, is_tls, peer_pid, peer_uid,
        peer_gid, parse_bool, parse_probability, parse_delay, read_password and nanosleep
        from later nbdkit versions.

        API_VERSION (default 1) selects the calling convention. Version 1: pread(h, count,
        offset) returns the data; pwrite(h, buf, offset), flush(h), trim(h, count, offset),
        zero(h, count, offset, may_trim). Version 2: pread(h, buf, offset, flags) fills buf,
        and every data callback takes flags (nbdkit.FLAG_*). cache(h, count, offset, flags)
        and extents(h, count, offset, flags) are the same in both.

        Everything else follows nbdkit's python plugin: open(readonly); a can_* or
        is_rotational callback counts as true only if it returns True itself (1 is false);
        a missing can_write, can_flush, can_trim, can_zero or can_extents is true when the
        matching data callback exists; can_fua defaults to FUA_EMULATE when flush exists,
        can_cache to CACHE_NATIVE when cache exists, can_fast_zero to the opposite of
        can_zero. extents returns (offset, length, type) tuples; list_exports names or
        (name, description) tuples; default_export and export_description strings;
        block_size a (minimum, preferred, maximum) tuple. preconnect(readonly), get_ready,
        after_fork, cleanup, config(key, value), config_complete, dump_plugin and
        thread_model() are called as nbdkit calls them. The thread model defaults to
        SERIALIZE_ALL_REQUESTS; a script may relax it with thread_model().

        A callback that raises fails the request with EIO, or with the errno given to
        nbdkit.set_error first; the log gets one line naming the script, the callback and
        the exception (the traceback too with -v). A zero that calls
        nbdkit.set_error(errno.EOPNOTSUPP) falls back to writing zeroes with pwrite,
        whether it then raises or returns. Exceptions in close are only logged.

        Scripts run in pynbd's own interpreter: a plugin may import anything installed
        there. Callbacks run in worker threads; under the PARALLEL and SERIALIZE_REQUESTS
        models in several at once, as under nbdkit (the GIL makes Python code take turns; a
        callback waiting for I/O lets others run). A callback that provably never blocks
        -- straight-line code on in-memory data that leaves the handle alone, such as a
        RAM disk's "buf[:] = disk[offset:offset + len(buf)]" -- is answered on the
        server's event loop instead when the server allows it (pread of a PARALLEL
        script), saving a thread hop per request.
        Anything doing I/O, taking a lock, sleeping or calling the script's own helpers
        stays in a thread, so a blocking script never stalls other clients.

        This is nbdkit-python-plugin(3) for pynbd; the command lines are the same.

    PARAMETERS
        [script=]SCRIPT
            The Python file to run. It must come first; "script=" may be omitted.

        KEY=VALUE
            Every other parameter is passed to the script's config(key, value). A script
            without config takes no parameters.

    EXAMPLES
        Serve a RAM disk script:

            pynbd serve python ./ramdisk.py

        A read-only view of an HTTP object, with a script that takes url=:

            pynbd serve -r python ./url.py url=http://example.com/disk.img

        What nbdkit would print for the script (pynbd's python version):

            pynbd serve python ./ramdisk.py --dump-plugin
    """

    name = "python"
    version = __version__
    magic_config_key = None
    thread_model = ThreadModel.PARALLEL
    nonblocking = False
    config_help = _CONFIG_HELP

    def __init__(self) -> None:
        self.script: str | None = None
        self.api = 1
        self._ns: dict[str, Any] = {}
        self._saved_modules: dict[str, Any] | None = None
        self._pure_pread: Pure | None = None

    # ---- loading ---------------------------------------------------------------------
    def _load(self, path: str) -> None:
        """Run the script as ``__main__`` (nbdkit's PyRun_SimpleFileEx) and check it."""
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError as e:
            raise ConfigError(f"{path}: cannot open file: {e.strerror}") from None
        try:
            code = compile(source, path, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as e:
            log.debug("%s", "".join(traceback.format_exception_only(e)).rstrip())
            raise ConfigError(f"{path}: error running this script: {_describe(e)}") from None
        module = types.ModuleType("__main__")
        module.__dict__.update(__file__=path, __builtins__=builtins, __cached__=None)
        self._install(module)
        self.script = path
        self._ns = module.__dict__
        try:
            exec(code, self._ns)  # noqa: S102 - running the script is this plugin's job
        except _SCRIPT_ERRORS as e:
            if isinstance(e, SystemExit) and not isinstance(e.code, str):
                raise  # sys.exit(N) in the script ends the server with N, as under nbdkit
            log.debug("%s", "".join(traceback.format_exception(e)).rstrip())
            raise ConfigError(f"{path}: error running this script: {_describe(e)}") from None
        if self._fn("open") is None or self._fn("get_size") is None or \
                self._fn("pread") is None:
            raise ConfigError(f"{path}: one of the required callbacks 'open', 'get_size' or "
                              "'pread' is not defined by this Python script.  nbdkit requires "
                              "these callbacks.")
        self.api = self._api_version()

    def _install(self, module: types.ModuleType) -> None:
        """Make ``import nbdkit`` work and the script the ``__main__`` module (what pickle,
        dataclasses and typing look up); :meth:`unload` puts the old entries back."""
        self._saved_modules = {k: sys.modules.get(k) for k in ("__main__", "nbdkit")}
        sys.modules["nbdkit"] = nbdkit
        sys.modules["__main__"] = module

    def _api_version(self) -> int:
        obj = self._ns.get("API_VERSION")
        if obj is None:
            return 1
        try:
            value = operator.index(obj)
        except TypeError:
            value = -1
        if not 1 <= value <= MAX_API_VERSION:
            raise ConfigError(f"{self.script}: API_VERSION requested unknown version: {value}.  "
                              f"This plugin supports API versions between 1 and "
                              f"{MAX_API_VERSION}.")
        log.debug("module requested API_VERSION %d", value)
        return value

    def _fn(self, name: str) -> Callable[..., Any] | None:
        """The script's callback ``name``, looked up on every call as nbdkit does."""
        fn = self._ns.get(name)
        if fn is None:
            return None
        if not callable(fn):
            log.debug("object %s isn't callable", name)
            return None
        return fn  # type: ignore[no-any-return]

    # ---- errors ----------------------------------------------------------------------
    def _failed(self, callback: str, e: BaseException, logged: bool = True) -> CommandError:
        """A callback raised: one log line (traceback with -v); EIO or set_error's errno."""
        msg = f"{self.script}: {callback}: error: {_describe(e)}"
        if logged:
            log.error("%s", msg)
        log.debug("%s", "".join(traceback.format_exception(e)).rstrip())
        return CommandError(nbdkit._last_error() or errno.EIO, msg)

    def _error(self, msg: str) -> CommandError:
        """nbdkit_error(msg) and fail with EIO (a result of the wrong shape, say)."""
        log.error("%s", msg)
        return CommandError(errno.EIO, msg)

    def _call(self, callback: str, fn: Callable[..., Any], *args: Any) -> Any:
        nbdkit._reset_error()
        try:
            return fn(*args)
        except _SCRIPT_ERRORS as e:
            raise self._failed(callback, e) from None

    def _configure(self, callback: str, *args: Any) -> Any:
        """A configuration-time callback, if defined; its exception is a ConfigError."""
        fn = self._fn(callback) if self.script is not None else None
        if fn is None:
            return None
        try:
            return fn(*args)
        except _SCRIPT_ERRORS as e:
            log.debug("%s", "".join(traceback.format_exception(e)).rstrip())
            raise ConfigError(f"{self.script}: {callback}: error: {_describe(e)}") from None

    # ---- configuration ---------------------------------------------------------------
    def unload(self) -> None:
        saved, self._saved_modules = self._saved_modules, None
        for name, mod in (saved or {}).items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod

    def config(self, key: str, value: str) -> None:
        if self.script is None:
            if key != "script":
                raise ConfigError("the first parameter must be script=/path/to/python/script.py")
            self._load(value)
        elif self._fn("config") is None:
            raise ConfigError(f"{self.script}: this plugin does not need command line "
                              "configuration")
        else:
            self._configure("config", key, value)

    def config_complete(self) -> None:
        if self.script is None:
            raise ConfigError("the first parameter must be script=/path/to/python/script.py")
        self._configure("config_complete")

    def get_thread_model(self) -> ThreadModel:
        self._analyse()
        if self.script is None or self._fn("thread_model") is None:
            return ThreadModel.SERIALIZE_ALL_REQUESTS
        r = self._configure("thread_model")
        try:
            return ThreadModel(operator.index(r))
        except (TypeError, ValueError):
            raise ConfigError(f"{self.script}: thread_model: invalid thread model "
                              f"{r!r}") from None

    def _analyse(self) -> None:
        """Which callbacks never block (see :mod:`pynbd.plugins._python_pure`): pread then
        runs on the event loop when the server offers it (:meth:`pread_nowait`), and the
        plugin is nonblocking when every callback a connection may call is pure."""
        if self.script is None:
            return
        pure = {}
        for name in _CONNECTION_CALLBACKS:
            fn = self._fn(name)
            if fn is not None:
                pure[name] = analyse(name, fn, self._ns, nbdkit)
        self._pure_pread = pure.get("pread")
        # Per script, so per instance: the server reads it when it builds the chain (today
        # before configuration, so only pread_nowait profits until it reads it after).
        self.nonblocking = all(p is not None for p in pure.values())  # type: ignore[misc]
        log.debug("%s: callbacks that never block: %s", self.script,
                  ", ".join(n for n, p in pure.items() if p is not None) or "none")

    def get_ready(self) -> None:
        self._configure("get_ready")

    def after_fork(self) -> None:
        self._configure("after_fork")

    def cleanup(self) -> None:
        try:
            self._configure("cleanup")
        except ConfigError as e:  # nbdkit logs it and goes on exiting
            log.error("%s", e)

    def callbacks(self) -> frozenset[str]:
        """Every callback: nbdkit 1.32's python plugin defines them all (the script's
        missing ones answer with nbdkit's defaults), so --dump-plugin lists them all."""
        return frozenset(CALLBACKS)

    def dump_plugin(self) -> list[str]:
        lines = [f"python_version={platform.python_version()}",
                 "python_pep_384_abi_version=3",
                 f"nbdkit_python_maximum_api_version={MAX_API_VERSION}"]
        if self.script is not None and self._fn("dump_plugin") is not None:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    self._configure("dump_plugin")
                except ConfigError as e:
                    log.error("%s", e)
            lines += out.getvalue().splitlines()
        return lines

    # ---- connections -----------------------------------------------------------------
    def preconnect(self, readonly: bool) -> None:
        fn = self._fn("preconnect")
        if fn is not None:
            nbdkit._reset_error()
            try:
                fn(bool(readonly))
            except _SCRIPT_ERRORS as e:
                # the server logs the refusal with this message: one line, not two
                raise self._failed("preconnect", e, logged=False) from None

    def list_exports(self, readonly: bool, is_tls: bool) -> list[tuple[str, str]] | None:
        fn = self._fn("list_exports")
        if fn is None:
            return None  # the default export, as the core server does
        nbdkit._reset_error()
        try:
            r = fn(bool(readonly), bool(is_tls))
        except _SCRIPT_ERRORS as e:
            raise self._failed("list_exports", e, logged=False) from None
        return self._exports(r)

    def _exports(self, r: Any) -> list[tuple[str, str]]:
        try:
            items = iter(r)
        except TypeError:
            raise self._error("list_exports method did not return something which is "
                              "iterable") from None
        out = []
        for t in items:
            name = _string(t)
            if name is not None:
                out.append((name, ""))
                continue
            if not isinstance(t, tuple) or len(t) != 2:
                raise self._error("list_exports method did not return an iterable of 2-tuples")
            name, desc = _string(t[0]), _string(t[1])
            if name is None or desc is None:
                raise self._error("list_exports method did not return an iterable of "
                                  "string 2-tuples")
            out.append((name, desc))
        return out

    def default_export(self, readonly: bool, is_tls: bool) -> str | None:
        fn = self._fn("default_export")
        if fn is None:
            return ""
        name = _string(self._call("default_export", fn, bool(readonly), bool(is_tls)))
        if name is None:
            raise self._error("default_export method did not return a string")
        return name

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        fn = self._fn("open")
        if fn is None:
            raise self._error(f"{self.script}: missing callback: open")
        info = connection()
        if info is not None:
            nbdkit._export_names[info.id] = export_name
        return _Handle(self._call("open", fn, bool(readonly)))

    def close(self, h: Any) -> None:
        info = connection()
        if info is not None:
            nbdkit._export_names.pop(info.id, None)
        fn = self._fn("close")
        if fn is not None:
            try:
                fn(h.h)
            except _SCRIPT_ERRORS as e:
                self._failed("close", e)  # only logged, as nbdkit does

    # ---- export properties -----------------------------------------------------------
    def get_size(self, h: Any) -> int:
        fn = self._fn("get_size")
        if fn is None:
            raise self._error(f"{self.script}: missing callback: get_size")
        r = self._call("get_size", fn, h.h)
        try:
            return operator.index(r)
        except TypeError as e:
            raise self._failed("get_size", e) from None

    def export_description(self, h: Any) -> str | None:
        fn = self._fn("export_description")
        if fn is None:
            return None
        try:
            desc = _string(self._call("export_description", fn, h.h))
            if desc is None:
                self._error("export_description method did not return a string")
            return desc
        except CommandError:
            return None  # logged; nbdkit then sends no description

    def block_size(self, h: Any) -> tuple[int, int, int] | None:
        fn = self._fn("block_size")
        if fn is None:
            return None
        r = self._call("block_size", fn, h.h)
        try:
            if not isinstance(r, tuple) or len(r) != 3:
                raise TypeError("block_size must return a tuple of 3 integers")
            # PyArg_ParseTuple's "I": unsigned int, without overflow checking
            return tuple(operator.index(x) & 0xFFFFFFFF for x in r)  # type: ignore[return-value]
        except TypeError as e:
            raise self._failed("block_size", e) from None

    def _bool(self, h: Any, name: str, plain: str | None) -> bool:
        """nbdkit's boolean_callback: the script's answer counts only if it is True."""
        fn = self._fn(name)
        if fn is not None:
            return self._call(name, fn, h.h) is True
        return plain is not None and self._fn(plain) is not None

    def is_rotational(self, h: Any) -> bool:
        return self._bool(h, "is_rotational", None)

    def can_multi_conn(self, h: Any) -> bool:
        return self._bool(h, "can_multi_conn", None)

    def can_write(self, h: Any) -> bool:
        return self._bool(h, "can_write", "pwrite")

    def can_flush(self, h: Any) -> bool:
        return self._bool(h, "can_flush", "flush")

    def can_trim(self, h: Any) -> bool:
        return self._bool(h, "can_trim", "trim")

    def can_zero(self, h: Any) -> bool:
        if h.can_zero is None:
            h.can_zero = self._bool(h, "can_zero", "zero")
        return h.can_zero  # type: ignore[no-any-return]

    def can_fast_zero(self, h: Any) -> bool:
        if self._fn("can_fast_zero") is not None:
            return self._bool(h, "can_fast_zero", None)
        return not self.can_zero(h)

    def can_extents(self, h: Any) -> bool:
        return self._bool(h, "can_extents", "extents")

    def _mode(self, h: Any, name: str, plain: str, present: int) -> int:
        fn = self._fn(name)
        if fn is None:
            return present if self._fn(plain) is not None else 0
        r = self._call(name, fn, h.h)
        try:
            return operator.index(r)
        except TypeError as e:
            raise self._failed(name, e) from None

    def can_fua(self, h: Any) -> FuaMode:
        return self._mode(h, "can_fua", "flush", FuaMode.EMULATE)  # type: ignore[return-value]

    def can_cache(self, h: Any) -> CacheMode:
        return self._mode(h, "can_cache", "cache", CacheMode.NATIVE)  # type: ignore[return-value]

    # ---- data ------------------------------------------------------------------------
    def _data_fn(self, name: str) -> Callable[..., Any]:
        fn = self._fn(name)
        if fn is None:
            raise self._error(f"{name} not implemented")
        return fn

    # pread and pwrite are the hot path: what _fn, _call and _reset_error do is inlined.
    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        fn = self._ns.get("pread")
        if fn is None or not callable(fn):
            raise self._error(f"{self.script}: missing callback: pread")
        _tls.error = 0
        if self.api == 1:
            try:
                r = fn(h.h, count, offset)
            except _SCRIPT_ERRORS as e:
                raise self._failed("pread", e) from None
            return self._v1_data(r, count)
        buf = bytearray(count)
        view = memoryview(buf)
        try:
            fn(h.h, view, offset, flags)
        except _SCRIPT_ERRORS as e:
            raise self._failed("pread", e) from None
        finally:
            try:
                view.release()  # the script may not scribble on it once sent
            except BufferError:
                pass  # it kept a view of the view: nothing more to do
        return buf

    def pread_nowait(self, h: Any, count: int, offset: int, flags: int) -> Any:
        """pread on the event loop when the script's pread never blocks (PARALLEL
        scripts: the server asks only then); BlockingIOError sends it to a thread."""
        pure = self._pure_pread
        if pure is None or not pure.check(self._ns):
            raise BlockingIOError
        return self.pread(h, count, offset, flags)

    def _v1_data(self, r: Any, count: int) -> Any:
        """API 1: pread returned a buffer of at least ``count`` bytes; take the first."""
        if type(r) is bytes and len(r) == count:
            return r
        try:
            view = memoryview(r)
        except TypeError:
            raise self._error(f"{self.script}: value returned from pread does not support the "
                              "buffer protocol") from None
        if not view.c_contiguous:
            raise self._error(f"{self.script}: value returned from pread does not support the "
                              "buffer protocol")
        if view.nbytes < count:
            raise self._error(f"{self.script}: buffer returned from pread is too small")
        # a copy, as nbdkit's memcpy: the script may change its buffer afterwards
        return view.cast("B")[:count].tobytes()

    def pwrite(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        fn = self._ns.get("pwrite")
        if fn is None or not callable(fn):
            raise self._error("pwrite not implemented")
        if not buf.readonly:
            buf = buf.toreadonly()
        _tls.error = 0
        try:
            if self.api == 1:
                fn(h.h, buf, offset)
            else:
                fn(h.h, buf, offset, flags)
        except _SCRIPT_ERRORS as e:
            raise self._failed("pwrite", e) from None

    def flush(self, h: Any, flags: int) -> None:
        fn = self._data_fn("flush")
        if self.api == 1:
            self._call("flush", fn, h.h)
        else:
            self._call("flush", fn, h.h, flags)

    def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        fn = self._data_fn("trim")
        if self.api == 1:
            self._call("trim", fn, h.h, count, offset)
        else:
            self._call("trim", fn, h.h, count, offset, flags)

    def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        fn = self._fn("zero")
        if fn is None:
            log.debug("zero missing, falling back to pwrite")
            raise CommandError(errno.EOPNOTSUPP, "zero is not implemented")
        nbdkit._reset_error()
        try:
            if self.api == 1:
                fn(h.h, count, offset, bool(flags & _MAY_TRIM))
            else:
                fn(h.h, count, offset, flags)
        except _SCRIPT_ERRORS as e:
            if nbdkit._last_error() not in _NOTSUP:
                raise self._failed("zero", e) from None
        if nbdkit._last_error() in _NOTSUP:
            # set_error(EOPNOTSUPP): fall back to pwrite, whether zero raised or returned
            log.debug("zero requested falling back to pwrite")
            raise CommandError(errno.EOPNOTSUPP, "zero requested falling back to pwrite")

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        self._call("cache", self._data_fn("cache"), h.h, count, offset, flags)

    def extents(self, h: Any, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
        fn = self._fn("extents")
        if fn is None:  # the core server's answer: all allocated data
            return [(offset, count, 0)]
        r = self._call("extents", fn, h.h, count, offset, flags)
        try:
            items = iter(r)
        except TypeError:
            raise self._error("extents method did not return something which is "
                              "iterable") from None
        out = []
        for t in items:
            if not isinstance(t, tuple) or len(t) != 3:
                raise self._error("extents method did not return an iterable of 3-tuples")
            try:
                out.append((_unsigned(t[0], 64), _unsigned(t[1], 64), _unsigned(t[2], 32)))
            except (TypeError, OverflowError) as e:
                raise self._failed("extents", e) from None
        if not out:
            raise self._error("extents method cannot return an empty list")
        return out


def _string(obj: Any) -> str | None:
    """nbdkit's python_to_string: a str, or bytes taken as UTF-8; None for anything else."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "surrogateescape")
    return None


def _unsigned(obj: Any, bits: int) -> int:
    """PyLong_AsUnsignedLongLong / PyLong_AsUnsignedLong: an int in range, else an error."""
    if not isinstance(obj, int):
        raise TypeError(f"an integer is required, not {type(obj).__name__}")
    if obj < 0:
        raise OverflowError("can't convert negative int to unsigned")
    if obj >> bits:
        raise OverflowError(f"int too big to convert to a {bits}-bit unsigned integer")
    return obj


def is_nbdkit_script(path: str) -> bool:
    """Whether the Python file ``path`` is a plugin written against nbdkit's Python API
    (module-level ``open``, ``get_size`` and ``pread``) rather than a module defining a
    pynbd :class:`~pynbd.plugin.Plugin` subclass: for ``pynbd serve ./x.py``, which then
    runs it as ``pynbd serve python ./x.py``. Decided from the source without running it;
    a file that cannot be read or parsed is not one."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return False
    functions = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions.add(node.name)
        elif isinstance(node, ast.ClassDef) and any(
                (isinstance(b, ast.Name) and b.id == "Plugin") or
                (isinstance(b, ast.Attribute) and b.attr == "Plugin") for b in node.bases):
            return False
    return {"open", "get_size", "pread"} <= functions
