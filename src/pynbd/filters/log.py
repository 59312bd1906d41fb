"""The log filter: log every request. Its manual page is :class:`LogFilter`'s docstring."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._logformat import ENTER, LEAVE, PRINT, LogOutput, error_name, shell_quote
from pynbd.filters._params import parse_bool
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, Extent, Filter, Flag, ThreadModel

__all__ = ["LogFilter"]

_EXTENT_TYPES = {0: "", EXTENT_HOLE: "hole", EXTENT_ZERO: "zero",
                 EXTENT_HOLE | EXTENT_ZERO: "hole,zero"}


class _Handle:
    """One connection, as the log knows it."""

    __slots__ = ("connection", "export", "id", "tls")

    def __init__(self, connection: int, export: str, tls: bool) -> None:
        self.connection = connection
        self.export = export
        self.tls = tls
        self.id = 0  # transactions so far


class LogFilter(Filter):
    """NAME
        log - pynbd log filter

    SYNOPSIS
        pynbd serve --filter=log PLUGIN [logfile=FILE | logscript=SCRIPT]
                    [logappend=BOOL] [PLUGIN-ARGS...]

    DESCRIPTION
        log is a filter that logs every transaction to a file or to a script of yours. As
        the first filter it shows what the client asked; after other filters, what they made
        of it.

        The format is nbdkit's log filter's, line for line, so tools that read nbdkit's logs
        read these. Running the server with -f -v shows more (every call through every
        layer), but only in the foreground; this log is terser, easier to parse, and works
        in the background.

    PARAMETERS
        logfile=FILE
            Write the log to FILE (see LOG FILE FORMAT).

        logscript=SCRIPT
            Run SCRIPT for each log entry (see LOG SCRIPT).

        logappend=BOOL
            With true, append to FILE; with false (the default), an existing FILE is
            truncated when the server starts. It affects only logfile.

        logfile and logscript may both be given; with neither the filter logs nothing.

    LOG FILE FORMAT
        A client that lists the exports, then reads once:

            2020-08-06 02:07:23.080415 ListExports id=1 readonly=0 tls=0 ...
            2020-08-06 02:07:23.080502 ...ListExports id=1 exports=("") return=0
            2020-08-06 02:07:23.080712 connection=1 Connect export="" tls=0 size=0x400
                minsize=0x1 prefsize=0x200 maxsize=0xffffffff write=1 flush=1 rotational=0
                trim=1 zero=2 fua=2 extents=1 cache=2 fast_zero=1
            2020-08-06 02:07:23.080907 connection=1 Read id=1 offset=0x0 count=0x200 ...
            2020-08-06 02:07:23.080927 connection=1 ...Read id=1 return=0
            2020-08-06 02:07:23.081255 connection=1 Disconnect transactions=1

        (the Connect entry is one line). Every line starts with a UTC timestamp, YYYY-MM-DD
        HH:MM:SS.UUUUUU. Entries of a connection carry connection=N. The actions are Ready
        (with the thread model), Fork (when the server went into the background),
        Preconnect, ListExports, Connect, Read, Write, Zero, Trim, Extents, Cache, Flush and
        Disconnect (with the number of transactions).

        Calls are logged as two entries, the call ("... " at the end) and its return ("..."
        in front, return=0, or return=-1 and error=E, the error the client gets: EPERM, EIO,
        ENOMEM, ENOSPC, ESHUTDOWN, ENOTSUP, EOVERFLOW or EINVAL). Requests run in parallel,
        so entries of different requests interleave: id=N, unique within a connection (and,
        for Preconnect and ListExports, within the server), pairs them. Numbers are hex;
        strings and lists are shell-quoted.

    LOG SCRIPT
        With logscript=SCRIPT, each entry runs SCRIPT with bash, after assignments of the
        entry's fields as shell variables:

        $act
            The action: Read, Write...

        $connection
            The connection number, for entries of a connection.

        $type
            ENTER (a call), LEAVE (its return) or PRINT (a single entry).

        $id
            The transaction, pairing ENTER and LEAVE.

        $return, $error
            For LEAVE: 0 or -1, and the error name when -1.

        other variables
            Every other field: $offset, $count, $size, $extents (a bash array)...

        Scripts run on their own, in the background: their exit status is ignored, they
        cannot hold up or change a request, and two may run at once (entries can reach them
        out of order).

    EXAMPLES
        Log each transaction of a client of disk.img to disk.log:

            pynbd serve --filter=log file disk.img logfile=disk.log

        The same below the cow filter: comparing the two logs for the same client shows
        what the cow filter changes:

            pynbd serve --filter=cow --filter=log file disk.img logfile=disk.log2

        Print a message on every read:

            pynbd serve -f --filter=log memory 10M logscript='
                if [ "$act" = Read ] && [ "$type" = ENTER ]; then
                    echo "client is reading $count bytes from $offset" >&2
                fi'
    """

    name = "log"
    version = "1.0"
    config_help = (
        "logfile=<FILE>               The file to place the log in.\n"
        "logappend=<BOOL>             True to append to the log (default false).\n"
        "logscript=<SCRIPT>           Script to run for logging.")

    def __init__(self) -> None:
        self.logfile: str | None = None
        self.append = False
        self.out = LogOutput()
        self._lock = threading.Lock()
        self._connections = 0
        self._preconnects = 0
        self._listings = 0
        self._pid = os.getpid()

    # Configuration ---------------------------------------------------------------------
    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "logfile":
            self.logfile = value
        elif key == "logappend":
            self.append = parse_bool(value)
        elif key == "logscript":
            self.out.script = value
        else:
            next_config(key, value)

    def get_ready(self, thread_model: ThreadModel) -> None:
        if self.logfile is not None:
            try:
                self.out.open_file(self.logfile, self.append)
            except OSError as e:
                raise ConfigError(f"open: {self.logfile}: {e.strerror}") from None
        self._pid = os.getpid()
        self.out.emit(None, 0, "Ready", PRINT, f"thread_model={int(thread_model)}")

    def after_fork(self) -> None:
        if os.getpid() != self._pid:  # only when the server really went to the background
            self.out.emit(None, 0, "Fork", PRINT, "")

    def unload(self) -> None:
        self.out.close()

    # Connection ------------------------------------------------------------------------
    def _count(self, attr: str) -> int:
        with self._lock:
            n: int = getattr(self, attr) + 1
            setattr(self, attr, n)
            return n

    def _call(self, h: _Handle | None, id: int, act: str, text: str,
              fn: Callable[..., Any], *args: Any) -> Any:
        """nbdkit's LOG: an ENTER entry, the call, a LEAVE entry with its outcome."""
        conn = None if h is None else h.connection
        self.out.emit(conn, id, act, ENTER, text)
        try:
            r = fn(*args)
        except Exception as e:
            self.out.emit(conn, id, act, LEAVE, f"return=-1 error={error_name(e)}")
            raise
        self.out.emit(conn, id, act, LEAVE, "return=0")
        return r

    def preconnect(self, next_preconnect: Any, readonly: bool) -> None:
        self._call(None, self._count("_preconnects"), "Preconnect",
                   f"readonly={int(readonly)}", next_preconnect, readonly)

    def list_exports(self, next_list_exports: Any, readonly: bool,
                     is_tls: bool) -> list[tuple[str, str]] | None:
        id = self._count("_listings")
        self.out.emit(None, id, "ListExports", ENTER, f"readonly={int(readonly)} tls={int(is_tls)}")
        try:
            res = next_list_exports(readonly, is_tls)
        except Exception as e:
            self.out.emit(None, id, "ListExports", LEAVE, f"return=-1 error={error_name(e)}")
            raise
        names = [""] if res is None else [e if isinstance(e, str) else e[0] for e in res]
        listed = " ".join(shell_quote(str(n)) for n in names)
        self.out.emit(None, id, "ListExports", LEAVE, f"exports=({listed}) return=0")
        return res  # type: ignore[no-any-return]

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        next_open(readonly, export_name)
        return _Handle(self._count("_connections"), export_name, is_tls)

    def prepare(self, next: Any, h: _Handle, readonly: bool) -> None:
        size = next.get_size()
        w, f = int(next.can_write()), int(next.can_flush())
        r, t = int(next.is_rotational()), int(next.can_trim())
        z = 2 if next.can_zero() else int(next.can_write())  # NATIVE, EMULATE or NONE
        fua, e, c = int(next.can_fua()), int(next.can_extents()), int(next.can_cache())
        fz = int(next.can_fast_zero())
        mn, pref, mx = next.block_size() or (0, 0, 0)
        self.out.emit(h.connection, 0, "Connect", PRINT,
                      f"export={shell_quote(h.export)} tls={int(h.tls)} size=0x{size:x} "
                      f"minsize=0x{mn:x} prefsize=0x{pref:x} maxsize=0x{mx:x} write={w} "
                      f"flush={f} rotational={r} trim={t} zero={z} fua={fua} extents={e} "
                      f"cache={c} fast_zero={fz}")

    def finalize(self, next: Any, h: _Handle) -> None:
        self.out.emit(h.connection, 0, "Disconnect", PRINT, f"transactions={h.id}")

    # Data ------------------------------------------------------------------------------
    def _id(self, h: _Handle) -> int:
        with self._lock:
            h.id += 1
            return h.id

    def pread(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> Any:
        return self._call(h, self._id(h), "Read", f"offset=0x{offset:x} count=0x{count:x}",
                          next.pread, count, offset, flags)

    def pwrite(self, next: Any, h: _Handle, buf: Any, offset: int, flags: int) -> None:
        count = memoryview(buf).nbytes
        self._call(h, self._id(h), "Write",
                   f"offset=0x{offset:x} count=0x{count:x} fua={_bit(flags, Flag.FUA)}",
                   next.pwrite, buf, offset, flags)

    def flush(self, next: Any, h: _Handle, flags: int) -> None:
        self._call(h, self._id(h), "Flush", "", next.flush, flags)

    def trim(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> None:
        self._call(h, self._id(h), "Trim",
                   f"offset=0x{offset:x} count=0x{count:x} fua={_bit(flags, Flag.FUA)}",
                   next.trim, count, offset, flags)

    def zero(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> None:
        self._call(h, self._id(h), "Zero",
                   f"offset=0x{offset:x} count=0x{count:x} trim={_bit(flags, Flag.MAY_TRIM)} "
                   f"fua={_bit(flags, Flag.FUA)} fast={_bit(flags, Flag.FAST_ZERO)}",
                   next.zero, count, offset, flags)

    def cache(self, next: Any, h: _Handle, count: int, offset: int, flags: int) -> None:
        self._call(h, self._id(h), "Cache", f"offset=0x{offset:x} count=0x{count:x}",
                   next.cache, count, offset, flags)

    def extents(self, next: Any, h: _Handle, count: int, offset: int,
                flags: int) -> list[Extent]:
        id = self._id(h)
        self.out.emit(h.connection, id, "Extents", ENTER,
                      f"offset=0x{offset:x} count=0x{count:x} "
                      f"req_one={_bit(flags, Flag.REQ_ONE)}")
        try:
            exts = _extents(next, count, offset, flags)
        except Exception as e:
            self.out.emit(h.connection, id, "Extents", LEAVE,
                          f"return=-1 error={error_name(e)}")
            raise
        listed = " ".join(f'0x{o:x} 0x{n:x} "{_EXTENT_TYPES[t]}"' for o, n, t in exts)
        self.out.emit(h.connection, id, "Extents", LEAVE, f"extents=({listed}) return=0")
        return exts


def _bit(flags: int, flag: int) -> int:
    return 1 if flags & flag else 0


def _extents(next: Any, count: int, offset: int, flags: int) -> list[Extent]:
    """The extents of the layer below as nbdkit hands them to a filter: merged and cut at
    ``offset``, but the last one not cut at the end of the request (the log shows them so)."""
    if not next.can_extents():
        return [(offset, count, 0)]
    raw = next.layer.extents(next.handle, count, offset, flags)
    end = offset + count
    out: list[Extent] = []
    expect = None
    for e in raw or ():
        off, length, typ = int(e[0]), int(e[1]), int(e[2]) & (EXTENT_HOLE | EXTENT_ZERO)
        if expect is not None and off != expect:
            raise CommandError(errno.EIO, f"{next.layer.name}: extents are not contiguous")
        expect = off + length
        if length <= 0 or off + length <= offset:
            continue
        if out and off >= end:
            break
        if off < offset:
            length -= offset - off
            off = offset
        if out and out[-1][2] == typ:
            out[-1] = (out[-1][0], out[-1][1] + length, typ)
        else:
            out.append((off, length, typ))
    if not out or out[0][0] != offset:
        raise CommandError(errno.EIO,
                           f"{next.layer.name}: extents do not cover the requested offset")
    return out
