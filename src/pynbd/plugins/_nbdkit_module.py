"""The ``nbdkit`` module that nbdkit-API Python scripts import (``import nbdkit``).

The python plugin installs this module as ``sys.modules["nbdkit"]`` before it runs a script,
so ``import nbdkit`` in the script finds it (pynbd ships no top-level package of that name).
It offers what nbdkit 1.32's python plugin offers -- ``debug``, ``export_name``,
``set_error``, ``parse_size``, ``shutdown`` and every constant -- and the functions later
nbdkit versions added where pynbd can answer them the same way (``disconnect``, ``is_tls``,
``peer_pid``/``peer_uid``/``peer_gid``, ``parse_bool``, ``parse_probability``,
``parse_delay``, ``read_password``, ``nanosleep``).

Per-connection facts come from :func:`pynbd.plugin.connection`. The error set with
:func:`set_error` is per thread and forgotten before each callback, as nbdkit forgets it
before each request.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import re
import sys
import threading
import time

from pynbd import plugin as _plugin
from pynbd.errors import ConfigError as _ConfigError
from pynbd.filters import _params

__all__ = [
    "CACHE_EMULATE", "CACHE_NATIVE", "CACHE_NONE", "EXTENT_HOLE", "EXTENT_ZERO",
    "FLAG_FAST_ZERO", "FLAG_FUA", "FLAG_MAY_TRIM", "FLAG_REQ_ONE", "FUA_EMULATE",
    "FUA_NATIVE", "FUA_NONE", "THREAD_MODEL_PARALLEL", "THREAD_MODEL_SERIALIZE_ALL_REQUESTS",
    "THREAD_MODEL_SERIALIZE_CONNECTIONS", "THREAD_MODEL_SERIALIZE_REQUESTS", "debug",
    "disconnect", "export_name", "is_tls", "nanosleep", "parse_bool", "parse_delay",
    "parse_probability", "parse_size", "peer_gid", "peer_pid", "peer_uid", "read_password",
    "set_error", "shutdown",
]

_log = logging.getLogger("pynbd.plugins.python")

THREAD_MODEL_SERIALIZE_CONNECTIONS = 0
THREAD_MODEL_SERIALIZE_ALL_REQUESTS = 1
THREAD_MODEL_SERIALIZE_REQUESTS = 2
THREAD_MODEL_PARALLEL = 3
FLAG_MAY_TRIM = 1
FLAG_FUA = 2
FLAG_REQ_ONE = 4
FLAG_FAST_ZERO = 8
FUA_NONE = 0
FUA_EMULATE = 1
FUA_NATIVE = 2
CACHE_NONE = 0
CACHE_EMULATE = 1
CACHE_NATIVE = 2
EXTENT_HOLE = 1
EXTENT_ZERO = 2

# ---- state shared with the plugin (pynbd.plugins.python) --------------------------------

#: ``error``: the errno given to set_error since the current callback began (0: none).
_tls = threading.local()
#: Connection id -> the export name the plugin was opened with (nbdkit_export_name gives
#: the canonical name, after default_export).
_export_names: dict[int, str] = {}


def _reset_error() -> None:
    _tls.error = 0


def _last_error() -> int:
    return getattr(_tls, "error", 0)  # type: ignore[no-any-return]


def _str_arg(fn: str, value: object) -> str:
    """PyArg_ParseTuple's "s": a str, else its TypeError."""
    if not isinstance(value, str):
        raise TypeError(f"{fn}() argument 1 must be str, not {_type_name(value)}")
    return value


def _type_name(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _connection(what: str) -> _plugin.ConnectionInfo:
    info = _plugin.connection()
    if info is None:
        raise RuntimeError(f"nbdkit.{what} failed: no connection in this thread")
    return info


# ---- nbdkit 1.32 ----------------------------------------------------------------------


def debug(msg: str) -> None:
    """Log ``msg`` as a debug message (shown with ``pynbd serve -v``)."""
    _log.debug("python: %s", _str_arg("debug", msg))


def export_name() -> str:
    """The export name the client asked for, after the default export was resolved."""
    info = _connection("export_name")
    return _export_names.get(info.id, info.export_name or "")


def set_error(err: int) -> None:
    """Record ``err`` (an errno value) as the reason for the exception about to be raised."""
    _tls.error = operator.index(err)


def shutdown(*args: object) -> None:
    """Ask the server to shut down (asynchronously)."""
    _plugin.shutdown()


def _nbdkit_parse_size(text: str) -> int:
    """nbdkit_parse_size exactly; ValueError with nbdkit's message."""
    try:
        return _params.parse_size(text)
    except _ConfigError as e:
        raise ValueError(str(e)) from None


def parse_size(text: str) -> int:
    """Parse a size such as ``100M`` into bytes (nbdkit's syntax); ValueError if it cannot."""
    _str_arg("parse_size", text)
    try:
        return _nbdkit_parse_size(text)
    except ValueError as e:
        _log.error("%s", e)
        raise ValueError("Unable to parse string as size") from None


# ---- later nbdkit versions ----------------------------------------------------------


def disconnect(force: bool = False) -> None:
    """Drop the current client: at once with ``force``, else after in-flight requests."""
    _connection("disconnect").disconnect(bool(force))


def is_tls() -> bool:
    """Whether the current connection negotiated TLS."""
    return bool(_connection("is_tls").tls)


def _peer(what: str, value: int | None) -> int:
    if value is None:
        raise RuntimeError(f"nbdkit.{what}: only available on a Unix domain socket")
    return value


def peer_pid() -> int:
    """The process id of the client (Unix domain sockets only)."""
    return _peer("peer_pid", _connection("peer_pid").peer_pid)


def peer_uid() -> int:
    """The user id of the client (Unix domain sockets only)."""
    return _peer("peer_uid", _connection("peer_uid").peer_uid)


def peer_gid() -> int:
    """The group id of the client (Unix domain sockets only)."""
    return _peer("peer_gid", _connection("peer_gid").peer_gid)


def parse_bool(text: str) -> bool:
    """nbdkit's booleans: 1/true/t/yes/y/on, 0/false/f/no/n/off (any case)."""
    try:
        return _plugin.parse_bool(_str_arg("parse_bool", text))
    except _ConfigError as e:
        raise ValueError(str(e)) from None


_PROB_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(%|[:/]\s*"
                      r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?))?\s*")


def parse_probability(what: str, text: str) -> float:
    """A probability: ``0.1``, ``1e-1``, ``10%``, ``1:10`` or ``1/10`` (finite, >= 0; it
    may exceed 1, as ``200%``)."""
    _str_arg("parse_probability", what)
    m = _PROB_RE.fullmatch(_str_arg("parse_probability", text))
    value = math.nan
    if m is not None:
        value = float(m.group(1))
        if m.group(2) == "%":
            value /= 100
        elif m.group(3) is not None:
            denom = float(m.group(3))
            value = value / denom if denom else math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what}: could not parse probability: {text!r}")
    return value


_DELAY_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(s|ms|us|\u03bcs|ns)?\s*")
_DELAY_NS = {None: 10**9, "s": 10**9, "ms": 10**6, "us": 10**3, "\u03bcs": 10**3, "ns": 1}


def parse_delay(what: str, text: str) -> tuple[int, int]:
    """A delay such as ``1.5``, ``100ms``, ``20us``, ``5ns``, as (seconds, nanoseconds)."""
    _str_arg("parse_delay", what)
    m = _DELAY_RE.fullmatch(_str_arg("parse_delay", text))
    if m is None:
        raise ValueError(f"{what}: could not parse delay: {text!r}")
    whole, _, frac = m.group(1).partition(".")
    unit = _DELAY_NS[m.group(2)]
    ns = int(whole or "0") * unit + int((frac or "0")[:9].ljust(9, "0")) * unit // 10**9
    return divmod(ns, 10**9)


def nanosleep(secs: int, nsecs: int) -> None:
    """Sleep ``secs`` seconds plus ``nsecs`` nanoseconds."""
    time.sleep(operator.index(secs) + operator.index(nsecs) / 1e9)


def read_password(value: str) -> bytes:
    """A password parameter as nbdkit reads it: ``-`` asks on the terminal, ``+FILE``
    reads a file, ``-FD`` reads (and closes) a file descriptor, anything else is the
    password itself. A trailing newline read from a file or descriptor is dropped."""
    _str_arg("read_password", value)
    if value == "-":
        import getpass

        if not sys.stdin or not sys.stdin.isatty():
            raise RuntimeError("stdin is not a tty, cannot read password interactively")
        return getpass.getpass().encode()
    if value.startswith("+"):
        with open(value[1:], "rb") as f:
            data = f.read()
    elif value.startswith("-") and value[1:].isdigit():
        fd = int(value[1:])
        if fd <= 2:
            raise RuntimeError(f"cannot use password -FD for stdin/stdout/stderr: {value}")
        chunks = []
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
    else:
        return value.encode()
    return data[:-1] if data.endswith(b"\n") else data

