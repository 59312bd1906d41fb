"""nbdkit's shell-script calling convention, shared by the ``sh`` and ``eval`` plugins.

Every callback runs a script: ``SCRIPT METHOD ARGS...`` with ``$tmpdir`` in its environment,
``pwrite`` data on its stdin and ``pread`` data (or whatever the method answers) on its stdout.
The exit status says what happened:

    0  success (true, for a boolean method)
    1  error: stderr may start with an errno name (``ENOSPC out of space``)
    2  the method is missing: the per-method default applies
    3  false, for a boolean method (an error anywhere else)
    4+ error, like 1 (nbdkit 1.32: these codes are reserved)

This module holds what both plugins share: running a script (in the calling worker thread:
the server never runs these callbacks on its event loop), reading its answers the way
nbdkit 1.32's ``plugins/sh/call.c`` and ``methods.c`` read them, and a :class:`ShellPlugin`
base class whose callbacks are the methods of that convention. A subclass says only which
script answers a method (:meth:`ShellPlugin.script`) and how it is configured.
"""

from __future__ import annotations

import atexit
import enum
import errno
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any, ClassVar

from pynbd.errors import CommandError, ConfigError
from pynbd.filters import _params
from pynbd.plugin import (
    CALLBACKS,
    EXTENT_HOLE,
    EXTENT_ZERO,
    CacheMode,
    Extent,
    Flag,
    FuaMode,
    Plugin,
    ThreadModel,
)

__all__ = [
    "ERRNO_NAMES",
    "MAX_KNOWN_STATUS",
    "ScriptError",
    "ShellHandle",
    "ShellPlugin",
    "Status",
    "as_text",
    "chomp",
    "flags_string",
    "parse_default_export",
    "parse_exports",
    "parse_extents",
    "parse_size",
    "parse_stderr",
    "shell_quote",
]


class Status(enum.IntEnum):
    """What a script's exit status means (nbdkit's ``exit_code``)."""

    OK = 0
    ERROR = 1
    MISSING = 2
    FALSE = 3


#: The highest exit status with a meaning (``--dump-plugin`` prints it, as nbdkit 1.32 does).
MAX_KNOWN_STATUS = 3

#: The errno names a script may print first on stderr, as nbdkit 1.32 recognises them.
ERRNO_NAMES: dict[str, int] = {
    "EPERM": errno.EPERM, "EIO": errno.EIO, "ENOMEM": errno.ENOMEM, "EINVAL": errno.EINVAL,
    "ENOSPC": errno.ENOSPC, "EOVERFLOW": errno.EOVERFLOW, "ESHUTDOWN": errno.ESHUTDOWN,
    "ENOTSUP": errno.ENOTSUP, "EOPNOTSUPP": errno.EOPNOTSUPP, "EROFS": errno.EROFS,
    "EDQUOT": errno.EDQUOT, "EFBIG": errno.EFBIG,
}

#: Characters nbdkit's debug lines print without quoting (common/utils/quote.c).
_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_=,:/")
_C_SPACE = b" \t\n\v\f\r"
#: The thread_model method's answers (any case; nbdkit also takes the hyphenated spellings).
_THREAD_MODELS = {
    spelling: model
    for name, model in (("parallel", ThreadModel.PARALLEL),
                        ("serialize_requests", ThreadModel.SERIALIZE_REQUESTS),
                        ("serialize_all_requests", ThreadModel.SERIALIZE_ALL_REQUESTS),
                        ("serialize_connections", ThreadModel.SERIALIZE_CONNECTIONS))
    for spelling in (name, name.replace("_", "-"))
}
_MODES = {"none": 0, "emulate": 1, "native": 2}
_EXPORT_MODES = (b"NAMES", b"INTERLEAVED", b"NAMES+DESCRIPTIONS")


class ScriptError(CommandError):
    """A script failed: ``errno`` for the client, ``message`` for the log (``SCRIPT: text``),
    ``detail`` the whole of a multi-line stderr (nbdkit logs it at debug level)."""

    def __init__(self, err: int, message: str, detail: str | None = None) -> None:
        super().__init__(err, message)
        self.detail = detail


# ---- what scripts print ------------------------------------------------------------------


def _cstr(b: bytes) -> bytes:
    """What C sees of a buffer: everything before the first NUL."""
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def as_text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def chomp(b: bytes) -> bytes:
    """Remove one trailing newline (what every method's reader does)."""
    b = _cstr(b)
    return b[:-1] if b.endswith(b"\n") else b


def shell_quote(arg: str | bytes) -> str:
    """An argument as nbdkit's debug lines print it: as is when every character is safe,
    else in double quotes with ``$ ` \\ "`` escaped."""
    b = os.fsencode(arg)
    if all(c in _SAFE for c in b):
        return as_text(b)
    out = bytearray(b'"')
    for c in b:
        if c in b'$`\\"':
            out += b"\\"
        out.append(c)
    out += b'"'
    return as_text(bytes(out))


def parse_size(text: str | bytes) -> int:
    """``nbdkit_parse_size`` of a C string (cut at a NUL byte); raises ValueError with
    nbdkit's message."""
    try:
        return _params.parse_size(as_text(_cstr(os.fsencode(text))))
    except ConfigError as e:
        raise ValueError(str(e)) from None


def parse_stderr(script: str, err: bytes) -> ScriptError:
    """What a failed script's stderr means (nbdkit's ``handle_script_error``): an errno name
    first (any case, then whitespace or the end) picks the errno, anything else is EIO; the
    message is the rest of the first line."""
    eb = _cstr(err)
    code, skip = errno.EIO, 0
    for name, value in ERRNO_NAMES.items():
        if eb[:len(name)].upper() == name.encode():
            code, skip = value, len(name)
            break
    if skip and len(eb) > skip:
        if eb[skip] not in _C_SPACE:
            code, skip = errno.EIO, 0  # "EINVALID" is not EINVAL
        else:
            while skip < len(eb) and eb[skip] in _C_SPACE:
                skip += 1
    eb = eb.rstrip(b"\n")
    if not eb:
        return ScriptError(code, f"{script}: script exited with error, but did not print an "
                                 "error message on stderr")
    rest = eb[skip:]
    detail = None
    if b"\n" in rest:
        detail = f"{script}: {as_text(eb)}"
        rest = rest[:rest.index(b"\n")]
    return ScriptError(code, f"{script}: {as_text(rest)}", detail)


def flags_string(flags: int) -> str:
    """The flags argument: ``fua``, ``may_trim``, ``req_one``, ``fast``, comma-separated."""
    names = [n for bit, n in ((Flag.FUA, "fua"), (Flag.MAY_TRIM, "may_trim"),
                              (Flag.REQ_ONE, "req_one"), (Flag.FAST_ZERO, "fast"))
             if flags & bit]
    return ",".join(names)


def _complete_lines(out: bytes) -> list[bytes]:
    """The newline-terminated lines of ``out`` (text after the last newline is dropped)."""
    return _cstr(out).split(b"\n")[:-1]


def parse_exports(out: bytes) -> list[tuple[str, str]]:
    """``list_exports`` output: a mode line (NAMES, INTERLEAVED, NAMES+DESCRIPTIONS; any
    other first line is the first name of a NAMES list), then the names (and descriptions).
    Only newline-terminated lines count, as in nbdkit 1.32."""
    lines = _complete_lines(out)
    if not lines:
        return []
    mode = lines[0]
    if mode not in _EXPORT_MODES:
        mode, body = b"NAMES", lines
    else:
        body = lines[1:]
    if mode == b"NAMES":
        pairs = [(n, b"") for n in body]
    elif mode == b"INTERLEAVED":
        pairs = [(body[i], body[i + 1] if i + 1 < len(body) else b"")
                 for i in range(0, len(body), 2)]
    else:
        half = (len(body) + 1) // 2
        descs = body[half:]
        pairs = [(n, descs[i] if i < len(descs) else b"") for i, n in enumerate(body[:half])]
    return [(as_text(n), as_text(d)) for n, d in pairs]


def parse_default_export(out: bytes) -> str:
    """``default_export`` output: the first line, or the line after a list mode line."""
    s = _cstr(out)
    for mode in _EXPORT_MODES:
        if s.startswith(mode + b"\n"):
            s = s[len(mode) + 1:]
            break
    return as_text(s.split(b"\n", 1)[0])


def _extent_type(word: bytes) -> int:
    """The type field: an integer (as sscanf's %u reads it), or words with hole/zero."""
    m = re.match(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)", word)
    if m is not None:
        v = min(int(m.group(2)), (1 << 64) - 1)
        if m.group(1) == b"-":
            v = -v % (1 << 64)
        return v & 0xFFFFFFFF
    return (EXTENT_HOLE if b"hole" in word else 0) | (EXTENT_ZERO if b"zero" in word else 0)


def parse_extents(script: str, out: bytes) -> list[Extent]:
    """``extents`` output: lines ``OFFSET LENGTH [TYPE]`` (sizes in nbdkit's syntax).
    Raises :class:`ScriptError` (EIO) with nbdkit's message on a line it cannot read."""
    lines = _cstr(out).split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    extents: list[Extent] = []
    for line in lines:
        words = re.findall(rb"[^ \t]+", line)
        if len(words) < 2:
            shown = as_text(re.match(rb"[ \t]*[^ \t]*", line).group())  # type: ignore[union-attr]
            raise ScriptError(errno.EIO, f"{script}: extents: cannot parse {shown}")
        try:
            offset, length = parse_size(words[0]), parse_size(words[1])
        except ValueError as e:
            raise ScriptError(errno.EIO, str(e)) from None
        typ = _extent_type(words[2]) if len(words) > 2 else 0
        extents.append((offset, length, typ))
    return extents


# ---- running scripts ---------------------------------------------------------------------


#: Scripts that are not an executable format (no "#!"), as (path, inode, mtime): they run
#: under /bin/sh without first failing an exec each time (eval's scripts are all such).
_SHELL_SCRIPTS: set[tuple[bytes, int, int]] = set()


def _identity(path: str | bytes) -> tuple[bytes, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.fsencode(path), st.st_ino, st.st_mtime_ns)


def run(argv: Sequence[str | bytes], data: Any, env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Run ``argv`` once: ``data`` (or nothing) on its stdin, which is then closed; return
    (exit status, stdout, stderr), the status negative for death by a signal.

    Only the three pipes reach the script (every other descriptor of the server, client
    sockets included, is closed in the child), and SIGPIPE is back to its default there. A
    file that is not an executable format runs under /bin/sh, as execvp does; a script that
    cannot be run at all fails like one that printed ``perror``'s line and exited 1.
    """
    ident = _identity(argv[0])
    cmd = ["/bin/sh", *argv] if ident in _SHELL_SCRIPTS else argv
    try:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, close_fds=True)
    except OSError as e:
        if e.errno == errno.ENOEXEC and ident is not None and cmd is argv:
            _SHELL_SCRIPTS.add(ident)
            return run(argv, data, env)
        return 1, b"", os.fsencode(f"{os.fsdecode(argv[0])}: {e.strerror}\n")
    with p:
        out, err = p.communicate(data if data else None)  # a script may ignore its stdin
    return p.returncode, out, err


class ShellHandle:
    """A connection's handle: the string ``open`` printed, and the two answers nbdkit
    remembers per connection (``can_flush`` and ``can_zero``)."""

    __slots__ = ("can_flush", "can_zero", "h")

    def __init__(self, h: bytes) -> None:
        self.h = h
        self.can_flush: bool | None = None
        self.can_zero: bool | None = None

    def __repr__(self) -> str:
        return f"ShellHandle({self.h!r})"


def _bool(b: bool) -> str:
    return "true" if b else "false"


class ShellPlugin(Plugin):
    """Base of the ``sh`` and ``eval`` plugins: every callback is a script call.

    A subclass answers :meth:`script` (which file runs a method, or None: no script at
    all) and handles configuration. The methods run in the server's worker threads (they
    fork a process each time), under the thread model the script's ``thread_model`` asks
    for (``serialize_all_requests`` when it has none).
    """

    thread_model = ThreadModel.PARALLEL
    nonblocking = False
    #: Prefix of the private directory made at load (``$tmpdir``).
    tmpdir_prefix: ClassVar[str] = "pynbd"

    def __init__(self) -> None:
        self.tmpdir = ""
        self.log = logging.getLogger(f"pynbd.plugins.{self.name}")

    def script(self, method: str) -> str | None:
        """The file that runs ``method`` (None when there is no script at all)."""
        raise NotImplementedError

    # ---- calling -------------------------------------------------------------------------
    def call(self, method: str, *args: str | bytes, data: Any = None) -> tuple[Status, bytes]:
        """Run ``method``; OK, MISSING and FALSE are returned with stdout, any other status
        raises :class:`ScriptError` (its message is what nbdkit logs)."""
        script = self.script(method)
        assert script is not None
        argv = [script, method, *args]
        debug = self.log.isEnabledFor(logging.DEBUG)
        if debug:
            self.log.debug("calling: %s", " ".join(shell_quote(a) for a in argv))
        env = dict(os.environ)
        env["tmpdir"] = self.tmpdir
        code, out, err = run(argv, data, env)
        if code < 0:
            self.log.error("%s: script terminated by signal %d", script, -code)
            raise parse_stderr(script, err)
        if debug:
            self.log.debug("completed: %s %s: status %d", script, method, code)
        if code <= Status.FALSE and code != Status.ERROR:
            return Status(code), out
        raise parse_stderr(script, err)

    def _fail(self, e: ScriptError) -> None:
        """Log a failed call as nbdkit does (first line an error, a longer text as debug)."""
        if e.detail is not None:
            self.log.debug("%s", e.detail)
        self.log.error("%s", e.message)

    def conn_call(self, method: str, *args: str | bytes,
                  data: Any = None) -> tuple[Status, bytes]:
        """:meth:`call` for a connection: a failure is logged and raised to the client."""
        try:
            return self.call(method, *args, data=data)
        except ScriptError as e:
            self._fail(e)
            raise

    def config_call(self, method: str, *args: str | bytes) -> tuple[Status, bytes]:
        """:meth:`call` while configuring: a failure (FALSE included) is a ConfigError."""
        try:
            status, out = self.call(method, *args)
        except ScriptError as e:
            if e.detail is not None:
                self.log.debug("%s", e.detail)
            raise ConfigError(e.message) from None
        if status == Status.FALSE:
            raise ConfigError(self._unexpected(method).message)
        return status, out

    def _unexpected(self, method: str) -> ScriptError:
        return ScriptError(errno.EIO, f"{self.script(method)}: {method} method returned "
                                      "unexpected code (3/false)")

    def conn_error(self, e: ScriptError) -> ScriptError:
        """Log an error found in a script's answer; return it to be raised."""
        self._fail(e)
        return e

    def _read(self, method: str, *args: str | bytes, data: Any = None) -> tuple[Status, bytes]:
        """A connection call whose FALSE is an error (every method but the booleans)."""
        status, out = self.conn_call(method, *args, data=data)
        if status == Status.FALSE:
            raise self.conn_error(self._unexpected(method))
        return status, out

    # ---- lifecycle -----------------------------------------------------------------------
    def load(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix=self.tmpdir_prefix)
        self.log.debug("load: tmpdir: %s", self.tmpdir)
        # The directory goes even if configuration fails and unload never runs.
        atexit.register(self._remove_tmpdir)

    def _remove_tmpdir(self) -> None:
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def unload(self) -> None:
        if self.script("unload") is not None:
            try:
                self.call("unload")
            except ScriptError as e:  # errors from unload are ignored (and logged)
                self._fail(e)
        self._remove_tmpdir()
        atexit.unregister(self._remove_tmpdir)

    def callbacks(self) -> frozenset[str]:
        # A script may answer any method: every callback is defined, as in nbdkit's
        # sh and eval plugins (which have no cleanup callback).
        return frozenset(CALLBACKS) - {"cleanup"}

    def dump_plugin(self) -> list[str]:
        lines = [f"max_known_status={MAX_KNOWN_STATUS}"]
        if self.script("dump_plugin") is None:
            return lines
        try:
            status, out = self.call("dump_plugin")
        except ScriptError as e:
            self._fail(e)
            return lines
        if status == Status.FALSE:
            self._fail(self._unexpected("dump_plugin"))
        elif status == Status.OK:
            lines += as_text(_cstr(out)).splitlines()
        return lines

    def config_complete(self) -> None:
        self.config_call("config_complete")

    def get_thread_model(self) -> ThreadModel:
        if self.script("thread_model") is None:
            return ThreadModel.PARALLEL  # no script at all (--dump-plugin)
        status, out = self.config_call("thread_model")
        if status == Status.MISSING:
            return ThreadModel.SERIALIZE_ALL_REQUESTS
        text = as_text(chomp(out))
        model = _THREAD_MODELS.get(text.lower())
        if model is None:
            self.log.debug("%s: ignoring unrecognized thread model: %s",
                           self.script("thread_model"), text)
            return ThreadModel.SERIALIZE_ALL_REQUESTS
        return model

    def get_ready(self) -> None:
        self.config_call("get_ready")

    def after_fork(self) -> None:
        self.config_call("after_fork")

    # ---- before a connection has a handle ------------------------------------------------
    def preconnect(self, readonly: bool) -> None:
        self._read("preconnect", _bool(readonly))

    def list_exports(self, readonly: bool, is_tls: bool) -> list[tuple[str, str]] | None:
        status, out = self._read("list_exports", _bool(readonly), _bool(is_tls))
        if status == Status.MISSING:
            return None  # just the default export
        return parse_exports(out)

    def default_export(self, readonly: bool, is_tls: bool) -> str | None:
        status, out = self._read("default_export", _bool(readonly), _bool(is_tls))
        return "" if status == Status.MISSING else parse_default_export(out)

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> ShellHandle:
        status, out = self._read("open", _bool(readonly), os.fsencode(export_name),
                                 _bool(is_tls))
        if status == Status.MISSING:
            return ShellHandle(b"")
        h = chomp(out)
        if h:
            self.log.debug("sh: handle: %s", as_text(h))
        return ShellHandle(h)

    def close(self, h: ShellHandle) -> None:
        try:
            self.call("close", h.h)  # every status is ignored
        except ScriptError as e:
            self._fail(e)

    # ---- the export's properties ---------------------------------------------------------
    def export_description(self, h: ShellHandle) -> str | None:
        status, out = self._read("export_description", h.h)
        return None if status == Status.MISSING else as_text(chomp(out))

    def get_size(self, h: ShellHandle) -> int:
        status, out = self._read("get_size", h.h)
        script = self.script("get_size")
        if status == Status.MISSING:
            raise self.conn_error(ScriptError(errno.EIO,
                                              f"{script}: the get_size method is required"))
        text = chomp(out)
        try:
            return parse_size(text)
        except ValueError as e:
            self.log.error("%s", e)
            raise self.conn_error(ScriptError(
                errno.EIO, f"{script}: could not parse output from get_size method: "
                           f"{as_text(text)}")) from None

    def block_size(self, h: ShellHandle) -> tuple[int, int, int] | None:
        status, out = self._read("block_size", h.h)
        if status == Status.MISSING:
            return None
        words = re.findall(rb"[^ \t\n]+", _cstr(out))
        try:
            if len(words) >= 3:
                return (parse_size(words[0]), parse_size(words[1]), parse_size(words[2]))
        except ValueError as e:
            self.log.error("%s", e)
        raise self.conn_error(ScriptError(
            errno.EIO, f"{self.script('block_size')}: block_size method cannot be parsed"))

    def _boolean(self, method: str, h: ShellHandle, default: bool) -> bool:
        status, _ = self.conn_call(method, h.h)
        if status == Status.MISSING:
            return default
        return status == Status.OK

    def can_write(self, h: ShellHandle) -> bool:
        return self._boolean("can_write", h, False)

    def can_flush(self, h: ShellHandle) -> bool:
        if h.can_flush is None:
            h.can_flush = self._boolean("can_flush", h, False)
        return h.can_flush

    def is_rotational(self, h: ShellHandle) -> bool:
        return self._boolean("is_rotational", h, False)

    def can_trim(self, h: ShellHandle) -> bool:
        return self._boolean("can_trim", h, False)

    def can_zero(self, h: ShellHandle) -> bool:
        if h.can_zero is None:
            h.can_zero = self._boolean("can_zero", h, False)
        return h.can_zero

    def can_extents(self, h: ShellHandle) -> bool:
        return self._boolean("can_extents", h, False)

    def can_multi_conn(self, h: ShellHandle) -> bool:
        return self._boolean("can_multi_conn", h, False)

    def can_fast_zero(self, h: ShellHandle) -> bool:
        status, _ = self.conn_call("can_fast_zero", h.h)
        if status == Status.MISSING:
            return not self.can_zero(h)  # fast zeroes fail fast when zero is emulated
        return status == Status.OK

    def _mode(self, method: str, h: ShellHandle) -> int | None:
        """none/emulate/native (can_fua, can_cache); None when the method is missing."""
        status, out = self._read(method, h.h)
        if status == Status.MISSING:
            return None
        text = as_text(chomp(out))
        mode = _MODES.get(text.lower())
        if mode is None:
            raise self.conn_error(ScriptError(
                errno.EIO, f"{self.script(method)}: could not parse output from {method} "
                           f"method: {text}"))
        return mode

    def can_fua(self, h: ShellHandle) -> FuaMode:
        mode = self._mode("can_fua", h)
        if mode is None:
            return FuaMode.EMULATE if self.can_flush(h) else FuaMode.NONE
        return FuaMode(mode)

    def can_cache(self, h: ShellHandle) -> CacheMode:
        mode = self._mode("can_cache", h)
        # Missing: none (emulating by reading might be slow; nbdkit cannot know either).
        return CacheMode.NONE if mode is None else CacheMode(mode)

    # ---- data ----------------------------------------------------------------------------
    def pread(self, h: ShellHandle, count: int, offset: int, flags: int) -> bytes:
        status, out = self._read("pread", h.h, str(count), str(offset))
        script = self.script("pread")
        if status == Status.MISSING:
            raise self.conn_error(ScriptError(errno.EIO,
                                              f"{script}: the pread method is required"))
        if len(out) != count:
            raise self.conn_error(ScriptError(
                errno.EIO, f"{script}: incorrect amount of data read: expecting {count} "
                           f"bytes but received {len(out)} bytes from the script"))
        return out

    def pwrite(self, h: ShellHandle, buf: memoryview, offset: int, flags: int) -> None:
        status, _ = self._read("pwrite", h.h, str(len(buf)), str(offset), flags_string(flags),
                               data=buf)
        if status == Status.MISSING:
            raise self.conn_error(ScriptError(errno.EIO, "pwrite not implemented"))

    def flush(self, h: ShellHandle, flags: int) -> None:
        self._read("flush", h.h)  # missing: nothing to flush

    def trim(self, h: ShellHandle, count: int, offset: int, flags: int) -> None:
        self._read("trim", h.h, str(count), str(offset), flags_string(flags))

    def zero(self, h: ShellHandle, count: int, offset: int, flags: int) -> None:
        status, _ = self._read("zero", h.h, str(count), str(offset), flags_string(flags))
        if status == Status.MISSING:
            self.log.debug("zero falling back to pwrite")
            raise CommandError(errno.EOPNOTSUPP, "zero falling back to pwrite")

    def extents(self, h: ShellHandle, count: int, offset: int, flags: int) -> list[Extent]:
        status, out = self._read("extents", h.h, str(count), str(offset), flags_string(flags))
        script = self.script("extents")
        assert script is not None
        if status == Status.MISSING:
            raise self.conn_error(ScriptError(
                errno.EIO, f"{script}: can_extents returned true, but extents method is "
                           "not defined"))
        try:
            extents = parse_extents(script, out)
        except ScriptError as e:
            raise self.conn_error(e) from None
        if self.log.isEnabledFor(logging.DEBUG):
            for ext in extents:
                self.log.debug("%s: adding extent %d %d %d", script, *ext)
        return extents

    def cache(self, h: ShellHandle, count: int, offset: int, flags: int) -> None:
        self._read("cache", h.h, str(count), str(offset))
