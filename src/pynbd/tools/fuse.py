"""``pynbd fuse``: show an NBD export as a regular file (libnbd's nbdfuse).

    pynbd fuse [-C N] [-d] [-o FUSE-OPTION] [-P PIDFILE] [-r] [-s] [-v] [-f|--background]
               MOUNTPOINT[/FILENAME] URI
    pynbd fuse MOUNTPOINT[/FILENAME] [ CMD [ARGS ...] ]
    pynbd fuse MOUNTPOINT[/FILENAME] --command CMD [ARGS ...]
    pynbd fuse MOUNTPOINT[/FILENAME] --socket-activation CMD [ARGS ...]
    pynbd fuse MOUNTPOINT[/FILENAME] --fd N | --tcp HOST PORT | --unix SOCKET | --vsock CID PORT

Each FUSE request becomes one NBD request. With a multi-conn server, worker processes serve
the mount, one connection each, one request at a time in blocking calls
(:mod:`pynbd.tools._fuse_sync`); otherwise this process serves on one event loop with
:class:`pynbd.client.AsyncClient`, as many requests in flight as the kernel sends. The kernel
side is :mod:`pynbd.tools._fuse_kernel`. The user guide is docs/fuse.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import getopt
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from pynbd import __version__
from pynbd.tools import _fuse_kernel as fk

__all__ = ["main"]

PROG = "pynbd fuse"

USAGE = """\

Mount NBD server as a virtual file:

    pynbd fuse [-C N|--connections N] [-d] [-o FUSE-OPTION] [-P PIDFILE]
               [-r] [-s] [-v] [-f|--foreground|--background]
               MOUNTPOINT[/FILENAME] URI

Other modes:

    pynbd fuse MOUNTPOINT[/FILENAME] [ CMD [ARGS ...] ]
    pynbd fuse MOUNTPOINT[/FILENAME] --command CMD [ARGS ...]
    pynbd fuse MOUNTPOINT[/FILENAME] --socket-activation CMD [ARGS ...]
    pynbd fuse MOUNTPOINT[/FILENAME] --fd N
    pynbd fuse MOUNTPOINT[/FILENAME] --tcp HOST PORT
    pynbd fuse MOUNTPOINT[/FILENAME] --unix SOCKET
    pynbd fuse MOUNTPOINT[/FILENAME] --vsock CID PORT

To unmount:

    fusermount3 -u MOUNTPOINT

Other options:

    pynbd fuse --help
    pynbd fuse --fuse-help
    pynbd fuse -V|--version

Please read docs/fuse.md for full usage.

"""

FUSE_HELP = """\
FUSE options (-o OPT[,OPT...]):
    -o allow_other          allow other users to use the file (needs user_allow_other
                            in /etc/fuse.conf when not root)
    -o default_permissions  let the kernel check the file's permission bits
    -o kernel_cache         keep the kernel's page cache across opens
    -o direct_io            bypass the page cache: each read/write goes straight to the server
    -o max_read=N           largest read the kernel sends (bytes)
    -o max_readahead=N      largest readahead the kernel does (bytes)
    -o uid=N, -o gid=N      owner shown for the file
    -o ro                   mount read-only (as -r)
    -o rw                   (the default)
    -o fsname=NAME          the name shown as the mount's source
    -o subtype=NAME         the name after "fuse." in the mount type
"""

#: Seconds the file's size and the directory entry may be cached by the kernel (they never
#: change while mounted; libfuse's default timeout is 1 s).
ATTR_VALID = 1.0
#: Seconds to let requests still in flight finish at shutdown (nbdfuse's RELEASE_TIMEOUT).
RELEASE_TIMEOUT = 5.0
#: Largest single NBD request; bigger FUSE requests cannot happen (the kernel's max is 1 MiB)
#: but fallocate ranges can be any size and are split at this.
MAX_REQUEST_SIZE = 32 * 1024 * 1024
#: The kernel's readahead for a FUSE mount (-o max_readahead above it needs root).
KERNEL_READAHEAD = 128 * 1024
#: The readahead set for the mount when root and no -o max_readahead is given: sequential
#: readers through the page cache then get up to 1 MiB requests, several in flight, instead
#: of one 128 KiB request at a time. Random reads are not affected (the kernel reads only
#: what a random reader asks for).
DEFAULT_READAHEAD = 4 << 20
#: Requests in flight on one connection before the next connection is used (multi-conn).
SPILL = 16
#: Read buffers kept per size for reuse (the kernel has at most max_background + a few
#: synchronous reads outstanding).
BUFFER_POOL = 64
#: nbdfuse's default number of connections when the server allows multi-conn.
DEFAULT_CONNECTIONS = 4

ROOT_INO = 1
FILE_INO = 2  # in directory mode; in file ("naked") mode the root is the file


class UsageError(Exception):
    pass


class _Eager:
    """Runs a request's coroutine now, up to its first wait, then on from the done-callbacks
    of the futures it waits for: a FUSE request reaches the server in the callback that read
    it, with no task and no extra loop iteration. The coroutines run here await only futures
    (the client's replies, its flow-control slots and the -s lock), never a timer or a task."""

    __slots__ = ("_waiting", "coro", "owner")

    def __init__(self, coro: Coroutine[Any, Any, None], owner: set[Any]) -> None:
        self.coro = coro
        self.owner = owner
        self._waiting: asyncio.Future[Any] | None = None
        owner.add(self)  # before the first step: it may also be the last
        self._step(None)

    def _step(self, _fut: Any, exc: BaseException | None = None) -> None:
        self._waiting = None
        try:
            y = self.coro.send(None) if exc is None else self.coro.throw(exc)
        except BaseException as e:  # noqa: BLE001
            self.owner.discard(self)
            if not isinstance(e, (StopIteration, asyncio.CancelledError)):
                print(f"{PROG}: internal error: {e!r}", file=sys.stderr)
            return
        if y is None:  # a bare yield (asyncio.sleep(0))
            asyncio.get_running_loop().call_soon(self._step, None)
        else:
            y._asyncio_future_blocking = False
            self._waiting = y
            y.add_done_callback(self._step)

    def cancel(self) -> None:
        w = self._waiting
        if w is not None:
            w.remove_done_callback(self._step)
            self._step(None, asyncio.CancelledError())


# ----------------------------------------------------------------------------------------
# command line
@dataclass
class Options:
    connections: int = DEFAULT_CONNECTIONS
    verbose: bool = False
    readonly: bool = False
    mount_ro: bool = False  # -o ro: a read-only mount (EROFS); -r alone gives EACCES
    single: bool = False
    background: bool = False
    pidfile: str | None = None
    mountpoint: str = ""
    filename: str = "nbd"
    file_mode: bool = False
    # FUSE options
    mount_options: list[str] = field(default_factory=list)
    kernel_cache: bool = False
    direct_io: bool = False
    max_readahead: int | None = None
    uid: int = field(default_factory=os.geteuid)
    gid: int = field(default_factory=os.getegid)
    fsname: str = "pynbd"
    subtype: str = "pynbd"
    # the server
    mode: str = "uri"
    args: list[str] = field(default_factory=list)
    #: The working directory the command line's relative paths are relative to (this
    #: process and its workers leave it before mounting).
    cwd: str = ""


def _int_arg(what: str, s: str, lo: int = 0) -> int:
    try:
        v = int(s, 0)
    except ValueError:
        raise UsageError(f"could not parse {what}: {s}") from None
    if v < lo:
        raise UsageError(f"{what} out of range: {s}")
    return v


def _fuse_option(o: Options, opt: str) -> None:
    name, eq, value = opt.partition("=")
    if not name:
        return
    if name in ("allow_other", "default_permissions", "allow_root") and not eq:
        if name == "allow_root":  # libfuse turns allow_root into allow_other + a check
            name = "allow_other"
        o.mount_options.append(name)
    elif name == "max_read" and eq:
        o.mount_options.append(f"max_read={_int_arg('max_read', value, 1)}")
    elif name == "max_readahead" and eq:
        o.max_readahead = _int_arg("max_readahead", value)
    elif name == "kernel_cache" and not eq:
        o.kernel_cache = True
    elif name == "direct_io" and not eq:
        o.direct_io = True
    elif name == "uid" and eq:
        o.uid = _int_arg("uid", value)
    elif name == "gid" and eq:
        o.gid = _int_arg("gid", value)
    elif name == "ro" and not eq:
        o.readonly = o.mount_ro = True
    elif name == "rw" and not eq:
        pass
    elif name in ("fsname", "subtype") and eq and value and "," not in value:
        setattr(o, name, value)
    else:
        raise UsageError(f"unknown FUSE option: -o {opt} (see --fuse-help)")


def parse_args(argv: list[str]) -> Options | int:
    """Parse the command line; an int is an exit status (after --help etc.)."""
    o = Options(cwd=os.getcwd())
    try:
        # POSIX getopt stops at the first non-option (the mountpoint), as nbdfuse's "+".
        opts, rest = getopt.getopt(argv, "C:dfo:P:rsvV", [
            "connections=", "foreground", "background", "fuse-help", "help", "pidfile=",
            "pid-file=", "readonly", "read-only", "verbose", "version"])
    except getopt.GetoptError as e:
        raise UsageError(str(e)) from None
    for k, v in opts:
        if k == "--help":
            sys.stdout.write(USAGE)
            return 0
        if k == "--fuse-help":
            sys.stdout.write(FUSE_HELP)
            return 0
        if k in ("-V", "--version"):
            print(f"pynbd fuse {__version__}")
            return 0
        if k in ("-C", "--connections"):
            o.connections = _int_arg("number of connections", v, 1)
        elif k in ("-d", "-v", "--verbose"):
            o.verbose = True
        elif k in ("-f", "--foreground"):
            o.background = False
        elif k == "--background":
            o.background = True
        elif k == "-o":
            for part in v.split(","):
                _fuse_option(o, part)
        elif k in ("-P", "--pidfile", "--pid-file"):
            o.pidfile = os.path.abspath(v)
        elif k in ("-r", "--readonly", "--read-only"):
            o.readonly = True
        elif k == "-s":
            o.single = True
    if len(rest) < 2:
        raise UsageError("needs a MOUNTPOINT and a URI or a mode (see --help)"
                         if not rest else "needs a URI or a mode after the mountpoint "
                         "(see --help)")
    _mountpoint(o, rest[0])
    o.mountpoint = os.path.abspath(o.mountpoint)
    _mode(o, rest[1:])
    return o


def _mountpoint(o: Options, s: str) -> None:
    """MOUNTPOINT (a regular file: mounted over), MOUNTPOINT (a directory: holds "nbd") or
    MOUNTPOINT/FILENAME, as nbdfuse decides."""
    if os.path.isfile(s):
        o.file_mode = True
        o.mountpoint = s
        o.filename = os.path.basename(s)
        return
    if os.path.isdir(s):
        o.mountpoint = s
        o.filename = "nbd"
        return
    head, sep, tail = s.rpartition("/")
    if not sep or not tail or not os.path.isdir(head or "/"):
        raise UsageError(f'{s}: mountpoint must be "directory" or "directory/filename"')
    o.mountpoint = head or "/"
    o.filename = tail


def _mode(o: Options, a: list[str]) -> None:
    first = a[0]
    modes = {"--command": "command", "--cmd": "command", "[": "bracket",
             "--socket-activation": "socket-activation",
             "--systemd-socket-activation": "socket-activation",
             "--fd": "fd", "--tcp": "tcp", "--unix": "unix", "--vsock": "vsock",
             "--uri": "uri"}
    if first in modes:
        o.mode = modes[first]
        a = a[1:]
    elif first.startswith("-"):
        raise UsageError(f"unknown mode: {first} (see --help)")
    else:
        o.mode = "uri"
    need = {"uri": "a URI", "fd": "a file descriptor number", "unix": "a socket path",
            "tcp": "HOST PORT", "vsock": "CID PORT"}
    if o.mode in ("uri", "fd", "unix"):
        if len(a) != 1:
            raise UsageError(f"{first if o.mode != 'uri' or first == '--uri' else 'URI mode'}"
                             f": needs exactly {need[o.mode]}")
    elif o.mode in ("tcp", "vsock"):
        if len(a) != 2:
            raise UsageError(f"{first}: needs {need[o.mode]}")
    elif o.mode == "bracket":
        if len(a) < 2 or a[-1] != "]":
            raise UsageError("[ CMD ... ]: needs a command and a closing ] (a separate word)")
        a = a[:-1]
    elif not a:
        raise UsageError(f"{first}: needs a command to run")
    if o.mode == "fd":
        _int_arg("file descriptor", a[0])
    elif o.mode == "vsock":
        _int_arg("vsock cid", a[0])
        _int_arg("vsock port", a[1])
    elif o.mode == "tcp":
        _int_arg("port", a[1])
    o.args = a


# ----------------------------------------------------------------------------------------
# connecting
def _errmsg(e: BaseException) -> str:
    if isinstance(e, OSError) and (e.errno or e.strerror):
        text = os.strerror(e.errno) if e.errno else str(e.strerror)
        return text + (f": {e.filename}" if e.filename else "")
    return str(e) or type(e).__name__


def _describe(o: Options) -> str:
    """The server, as the user gave it, for error messages."""
    if o.mode in ("uri", "unix"):
        return o.args[0]
    if o.mode == "tcp":
        return f"{o.args[0]}:{o.args[1]}"
    if o.mode == "vsock":
        return f"vsock {o.args[0]}:{o.args[1]}"
    if o.mode == "fd":
        return f"fd {o.args[0]}"
    return o.args[0]  # the command


#: The modes that name an address (any number of connections can be opened to it).
ADDRESS_MODES = ("uri", "tcp", "unix", "vsock")


def _address(o: Options) -> dict[str, Any]:
    """The connect keywords for an address mode (both clients take them). A relative Unix
    socket path is taken from the directory the command was run in (the worker processes
    run in ``/``)."""
    if o.mode == "uri":
        from pynbd.client.negotiate import uri_target

        t = uri_target(o.args[0])
        path = t.get("unix")
        if path is None or path.startswith(("/", "\0")) or not path:
            return {"uri": o.args[0]}
        return {"unix": os.path.join(o.cwd, path), "export_name": t["export_name"]}
    if o.mode == "tcp":
        return {"host": o.args[0], "port": int(o.args[1], 0)}
    if o.mode == "vsock":
        return {"vsock": (int(o.args[0], 0), int(o.args[1], 0))}
    return {"unix": os.path.join(o.cwd, o.args[0])}


def _leave_mountpoint(mountpoint: str) -> None:
    """Before mounting: leave the working directory for ``/`` (as a daemon does), and drop
    the mountpoint and what is under it from the import path. Once mounted, looking there
    is a FUSE request to the process that serves it: an import that checks a directory on
    ``sys.path`` (``python -m`` puts the working directory there) would wait for ever."""
    real = os.path.realpath(mountpoint)
    inside = real.rstrip("/") + "/"

    def under(p: str) -> bool:
        r = os.path.realpath(p or ".")
        return r == real or r.startswith(inside)

    sys.path[:] = [p for p in sys.path if not under(p)]
    for p in [p for p in sys.path_importer_cache if isinstance(p, str) and under(p)]:
        del sys.path_importer_cache[p]
    os.chdir("/")


async def connect(o: Options, connections: int | None = None) -> Any:
    from pynbd.client.pool import connect as pool_connect

    if o.mode in ADDRESS_MODES:
        n = o.connections if connections is None else connections
        return await pool_connect(connections=n, **_address(o))
    kw: dict[str, Any] = {}
    if o.mode == "command":
        kw["command"] = o.args
    elif o.mode in ("bracket", "socket-activation"):
        kw["socket_activation"] = o.args
    else:  # fd
        kw["sock"] = socket.socket(fileno=int(o.args[0], 0))
    return await pool_connect(connections=1, **kw)


# ----------------------------------------------------------------------------------------
# the file
class NbdFile:
    """Answers FUSE requests for one file backed by an NBD export."""

    def __init__(self, o: Options, nbd: Any) -> None:
        self.o = o
        self.nbd = nbd
        self.clients: list[Any] = list(getattr(nbd, "clients", [nbd]))
        self.size: int = nbd.size
        self.readonly = o.readonly
        self.can_flush: bool = nbd.can_flush()
        self.can_trim: bool = nbd.can_trim()
        self.can_zero: bool = nbd.can_zero()
        self.file_ino = ROOT_INO if o.file_mode else FILE_INO
        self.name = os.fsencode(o.filename)
        t = time.time_ns()
        self.start = (t // 1_000_000_000, t % 1_000_000_000)
        self.ch: fk.FuseDevice | None = None
        self.tasks: set[_Eager] = set()
        self.lock = asyncio.Lock() if o.single else None
        self._last_error = ""
        self._buffers: dict[int, list[bytearray]] = {}
        self.open_flags = 0
        if o.direct_io:
            self.open_flags |= fk.FOPEN_DIRECT_IO | fk.FOPEN_PARALLEL_DIRECT_WRITES
        if o.kernel_cache:
            self.open_flags |= fk.FOPEN_KEEP_CACHE

    # -- attributes
    def file_attr(self) -> tuple[int, ...]:
        mode = stat.S_IFREG | (0o444 if self.readonly else 0o666)
        return fk.FuseChannel.attr(self.file_ino, mode, self.size, 1, self.o.uid, self.o.gid,
                                   self.start)

    def root_attr(self) -> tuple[int, ...]:
        return fk.FuseChannel.attr(ROOT_INO, stat.S_IFDIR | 0o755, 0, 2, self.o.uid,
                                   self.o.gid, self.start)

    def debug(self, what: str) -> None:
        if self.o.verbose:
            print(f"{PROG}: {what}", file=sys.stderr)

    # -- dispatch (runs in the channel's read callback; body valid only now)
    def handle(self, opcode: int, unique: int, nodeid: int, body: memoryview) -> None:
        ch = self.ch
        assert ch is not None
        if opcode == fk.READ:
            _, offset, size, _, _, _, _ = fk.READ_IN.unpack_from(body, 0)
            if self.o.verbose:
                self.debug(f"read: count={size}, offset={offset}")
            self._spawn(self._read(unique, offset, size))
        elif opcode == fk.WRITE:
            _, offset, size, _, _, _, _ = fk.WRITE_IN.unpack_from(body, 0)
            if self.o.verbose:
                self.debug(f"write: count={size}, offset={offset}")
            if self.readonly:
                ch.reply_error(unique, errno.EACCES)
                return
            data = bytes(body[fk.WRITE_IN.size:fk.WRITE_IN.size + size])
            self._spawn(self._write(unique, offset, data))
        elif opcode in (fk.FSYNC, fk.FSYNCDIR):
            self.debug("fsync")
            self._spawn(self._fsync(unique))
        elif opcode == fk.FALLOCATE:
            _, offset, length, mode, _ = fk.FALLOCATE_IN.unpack_from(body, 0)
            self.debug(f"fallocate: mode={mode}, offset={offset}, len={length}")
            self._spawn(self._fallocate(unique, mode, offset, length))
        else:
            self.handle_meta(opcode, unique, nodeid, body)

    def handle_meta(self, opcode: int, unique: int, nodeid: int, body: memoryview) -> None:
        """Every request but the four that go to the server (read, write, fsync,
        fallocate): answered from what is known, at once."""
        ch = self.ch
        assert ch is not None
        if opcode == fk.GETATTR:
            if nodeid == self.file_ino:
                ch.reply_attr(unique, self.file_attr(), ATTR_VALID)
            elif nodeid == ROOT_INO:
                ch.reply_attr(unique, self.root_attr(), ATTR_VALID)
            else:
                ch.reply_error(unique, errno.ENOENT)
        elif opcode == fk.LOOKUP:
            name = bytes(body).split(b"\0", 1)[0]
            self.debug(f"lookup: {os.fsdecode(name)}")
            if not self.o.file_mode and nodeid == ROOT_INO and name == self.name:
                ch.reply_entry(unique, FILE_INO, self.file_attr(), ATTR_VALID)
            else:
                ch.reply_error(unique, errno.ENOENT)
        elif opcode == fk.OPEN:
            (flags,) = fk.struct.unpack_from("=I", body, 0)
            self.debug(f"open: flags={flags:#o}")
            if nodeid != self.file_ino:
                ch.reply_error(unique, errno.EISDIR)
            elif self.readonly and (flags & os.O_ACCMODE) != os.O_RDONLY:
                ch.reply_error(unique, errno.EACCES)
            else:
                ch.reply_open(unique, self.open_flags)
        elif opcode == fk.SETATTR:
            (valid,) = fk.SETATTR_VALID.unpack_from(body, 0)[:1]
            if valid & (fk.FATTR_MODE | fk.FATTR_UID | fk.FATTR_GID):
                ch.reply_error(unique, errno.EPERM)  # the mode and owner are fixed
            elif valid & fk.FATTR_SIZE and self.readonly:
                ch.reply_error(unique, errno.EACCES)
            else:
                # A size change (O_TRUNC, ftruncate) is accepted and changes nothing, as on a
                # block device: the size is the export's (`cp disk.raw MOUNT/nbd` works).
                # Times (touch) have nowhere to go either.
                ch.reply_attr(unique, self.file_attr() if nodeid == self.file_ino
                              else self.root_attr(), ATTR_VALID)
        elif opcode in (fk.RELEASE, fk.RELEASEDIR):
            ch.reply(unique)
        elif opcode == fk.OPENDIR:
            if nodeid == ROOT_INO and not self.o.file_mode:
                ch.reply_open(unique, 0)
            else:
                ch.reply_error(unique, errno.ENOTDIR)
        elif opcode == fk.READDIR:
            _, offset, size, _, _, _, _ = fk.READ_IN.unpack_from(body, 0)
            entries = [(ROOT_INO, ".", fk.DT_DIR), (ROOT_INO, "..", fk.DT_DIR),
                       (FILE_INO, self.o.filename, fk.DT_REG)]
            ch.reply_dirents(unique, entries, offset, size)
        elif opcode == fk.STATFS:
            ch.reply_statfs(unique)
        else:
            # FLUSH (close needs no server round trip), xattrs, ACCESS, ...: ENOSYS, which
            # the kernel remembers, so it does not ask again.
            ch.reply_error(unique, errno.ENOSYS)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        _Eager(coro, self.tasks)

    def _pick(self) -> Any:
        """The connection for the next request: the first one with fewer than SPILL requests
        in flight. Few requests share one connection, so a batch goes out in one write and
        its replies come back in one read; more spill over to the other connections."""
        for c in self.clients:
            if c.in_flight < SPILL:
                return c
        return min(self.clients, key=lambda c: c.in_flight)

    def flush_requests(self) -> None:
        """Send the NBD requests queued while reading a batch of FUSE requests now, in one
        write per connection, rather than one loop iteration later."""
        for c in self.clients:
            c.send_now()

    def reply_failure(self, unique: int, e: BaseException) -> None:
        err = getattr(e, "errno", None)
        if not isinstance(err, int) or err <= 0 or isinstance(e, ConnectionError):
            err = errno.EIO
        msg = f"{PROG}: {_errmsg(e)}"
        if msg != self._last_error or self.o.verbose:  # a dead server: say it once
            print(msg, file=sys.stderr)
            self._last_error = msg
        assert self.ch is not None
        self.ch.reply_error(unique, err)

    async def _locked(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self.lock is None:
            return await coro
        async with self.lock:
            return await coro

    # -- data
    async def _read(self, unique: int, offset: int, count: int) -> None:
        assert self.ch is not None
        if offset >= self.size:
            self.ch.reply(unique)
            return
        count = min(count, self.size - offset, MAX_REQUEST_SIZE)
        # A buffer from the pool: the reply lands in it and the kernel copies it out in
        # writev, after which it is free again (no allocation, no page faults per read).
        free = self._buffers.get(count)
        buf = free.pop() if free else bytearray(count)
        try:
            if self.lock is None:
                await self._pick().pread_into(buf, offset)
            else:
                await self._locked(self._pick().pread_into(buf, offset))
        except Exception as e:  # noqa: BLE001
            self.reply_failure(unique, e)
            return
        self.ch.reply(unique, buf)
        free = self._buffers.setdefault(count, [])
        if len(free) < BUFFER_POOL:
            free.append(buf)

    def write_length(self, offset: int, count: int) -> int:
        """How much of a write at ``offset`` fits the export; -errno when none of it may be
        written (the export cannot grow: as writing past a disk's end)."""
        if offset >= self.size:
            return -errno.ENOSPC if count else 0
        return min(count, self.size - offset)

    async def _write(self, unique: int, offset: int, data: bytes) -> None:
        assert self.ch is not None
        n = self.write_length(offset, len(data))
        if n <= 0:
            self.ch.reply_error(unique, -n)
            return
        if n < len(data):
            data = data[:n]
        try:
            if self.lock is None:
                await self._pick().pwrite(data, offset)
            else:
                await self._locked(self._pick().pwrite(data, offset))
        except Exception as e:  # noqa: BLE001
            self.reply_failure(unique, e)
            return
        self.ch.reply(unique, fk.WRITE_OUT.pack(len(data), 0))

    async def _fsync(self, unique: int) -> None:
        assert self.ch is not None
        if not self.readonly and self.can_flush:
            try:
                await self._locked(self.nbd.flush())
            except Exception as e:  # noqa: BLE001
                self.reply_failure(unique, e)
                return
        self.ch.reply(unique)

    def fallocate_plan(self, mode: int, offset: int, length: int) -> tuple[str, int] | int:
        """What a fallocate asks of the server: ("trim" | "zero" | "write", end), or an
        errno to answer at once."""
        if self.readonly:
            return errno.EACCES
        if mode & fk.FALLOC_FL_PUNCH_HOLE:
            if not self.can_trim:
                return errno.EOPNOTSUPP
            op = "trim"
        elif mode & fk.FALLOC_FL_ZERO_RANGE:
            op = "zero" if self.can_zero else "write"
        else:  # plain allocation: nothing to do on a block device, and not promised
            return errno.EOPNOTSUPP
        return op, min(offset + length, self.size)

    @staticmethod
    def fallocate_steps(op: str, offset: int, end: int) -> list[tuple[int, int]]:
        """(offset, count) of each request a fallocate is split into."""
        step = MAX_REQUEST_SIZE if op != "write" else 1 << 20
        return [(pos, min(end - pos, step)) for pos in range(offset, end, step)]

    async def _fallocate(self, unique: int, mode: int, offset: int, length: int) -> None:
        ch = self.ch
        assert ch is not None
        plan = self.fallocate_plan(mode, offset, length)
        if isinstance(plan, int):
            ch.reply_error(unique, plan)
            return
        op, end = plan
        try:
            for pos, n in self.fallocate_steps(op, offset, end):
                if op == "trim":
                    await self._locked(self._pick().trim(n, pos))
                elif op == "zero":
                    await self._locked(self._pick().zero(n, pos))
                else:
                    await self._locked(self._pick().pwrite(bytes(n), pos))
        except Exception as e:  # noqa: BLE001
            self.reply_failure(unique, e)
            return
        ch.reply(unique)

    async def drain(self) -> bool:
        """Let requests in flight finish (at most RELEASE_TIMEOUT), then flush the server's
        cache. False when the server did not answer in time (nothing more is asked of it)."""
        if self.tasks:
            deadline = time.monotonic() + RELEASE_TIMEOUT
            while self.tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            stuck = bool(self.tasks)
            for t in list(self.tasks):
                t.cancel()
            if stuck:
                print(f"{PROG}: requests still in flight after {RELEASE_TIMEOUT:g} s; "
                      "giving up on them", file=sys.stderr)
                return False
        if not self.readonly and self.can_flush and not getattr(self.nbd, "failure", None):
            try:
                await asyncio.wait_for(self.nbd.flush(), RELEASE_TIMEOUT)
            except TimeoutError:
                print(f"{PROG}: flush at unmount: timed out", file=sys.stderr)
                return False
            except Exception as e:  # noqa: BLE001
                print(f"{PROG}: flush at unmount: {_errmsg(e)}", file=sys.stderr)
        return True


# ----------------------------------------------------------------------------------------
# running
async def serve(o: Options, ready: Any = None) -> int:
    """Connect, mount, answer requests until unmounted or signalled, clean up."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def on_signal(signame: str) -> None:
        if not stop.done():
            stop.set_result(signame)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(s, on_signal, s.name)

    try:
        # With worker processes this connection only learns what the export is (and whether
        # it allows multi-conn); otherwise it is the pool that serves.
        nbd = await _until(connect(o, 1 if _workers(o) else o.connections), stop)
    except Exception as e:  # noqa: BLE001
        print(f"{PROG}: {_describe(o)}: {_errmsg(e)}", file=sys.stderr)
        return 1
    if nbd is None:
        return 1
    responsive = True
    try:
        if nbd.is_read_only():
            o.readonly = True
        f = NbdFile(o, nbd)
        root_mode = stat.S_IFREG if o.file_mode else stat.S_IFDIR
        # Nothing may look at the mountpoint's path once mounted: a lookup would be a FUSE
        # request to this very loop and deadlock.
        real_mountpoint = os.path.realpath(o.mountpoint)
        _leave_mountpoint(real_mountpoint)
        try:
            fd = fk.mount(o.mountpoint, root_mode=root_mode, fsname=o.fsname,
                          subtype=o.subtype, options=o.mount_options, read_only=o.mount_ro)
        except fk.MountError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"{PROG}: {_errmsg(e)}", file=sys.stderr)
            return 1
        ra = o.max_readahead
        if ra is None and os.geteuid() == 0:
            ra = DEFAULT_READAHEAD
        if ra is not None and ra > KERNEL_READAHEAD:
            # before INIT is answered: the kernel takes the smaller of the two
            why_not = fk.set_readahead(real_mountpoint, ra)
            if why_not:
                if o.max_readahead is not None:  # asked for: say why not
                    print(f"{PROG}: cannot raise readahead: {why_not}", file=sys.stderr)
                ra = None
        ch = fk.FuseChannel(fd, f.handle, max_readahead=ra, after_batch=f.flush_requests)
        f.ch = ch
        workers: list[subprocess.Popen[bytes]] = []
        status = 0
        unmounted = False
        try:
            if o.pidfile:
                try:
                    with open(o.pidfile, "w") as fp:  # noqa: ASYNC230 (a few bytes, once)
                        fp.write(str(os.getpid()))
                except OSError as e:
                    print(f"{PROG}: pidfile: {_errmsg(e)}", file=sys.stderr)
            if ready is not None:
                ready()  # (in --background, stdout and stderr are /dev/null from here)
            n_workers = _workers(o) if nbd.can_multi_conn() else 0
            if n_workers:
                workers = _spawn_workers(o, fd, ra, n_workers)
            if workers:
                # They serve; this process only owns the mount and watches them.
                await _close(nbd, True)
            else:
                ch.start()
            f.debug(f"mounted {o.mountpoint} ({o.filename}, {f.size} bytes"
                    f"{', read-only' if o.readonly else ''}, "
                    f"{len(workers) or len(f.clients)} connection(s), "
                    f"{1 + len(workers)} process(es))")
            lost = asyncio.ensure_future(_watch_workers(workers))
            await asyncio.wait([ch.closed, stop, lost], return_when=asyncio.FIRST_COMPLETED)
            if lost.done():
                why, status = lost.result()
                unmounted = why == "unmounted"
                if status:
                    print(f"{PROG}: {why}", file=sys.stderr)
            else:
                lost.cancel()
                why = ch.closed.result() if ch.closed.done() else f"signal {stop.result()}"
                unmounted = why == "unmounted"
            f.debug(f"stopping: {why}")
            ch.stop(why)
            for w in workers:
                _signal(w, signal.SIGTERM)
            if not workers:
                responsive = await f.drain()
        finally:
            await _reap_workers(workers)
            # As libfuse: close the device first (the kernel aborts the connection, so the
            # unmount cannot recurse into this filesystem), then detach the mount.
            ch.close()
            if not unmounted:
                try:
                    fk.unmount(real_mountpoint)
                except fk.MountError as e:
                    print(f"{PROG}: {e}", file=sys.stderr)
        return status
    finally:
        await _close(nbd, responsive)


# ----------------------------------------------------------------------------------------
# worker processes
#
# With a server that allows multi-conn (and only then: the connections must share one
# cache), worker processes serve the mount, each on its own connection and its own clone of
# the FUSE device, one request at a time in blocking calls (pynbd.tools._fuse_sync): the
# kernel wakes one waiting worker per request. The main process mounts, starts them, and
# unmounts when they are done. Each is a fresh `python -m pynbd fuse` handed the device and
# the parsed options (never a fork of a running event loop). Without multi-conn, or with one
# connection, the main process serves alone on its event loop, many requests in flight.
WORKER_ENV = "PYNBD_FUSE_WORKER"
#: How many worker processes (PYNBD_FUSE_WORKERS=N overrides, at most -C; 0 turns them off).
WORKERS_ENV = "PYNBD_FUSE_WORKERS"
#: A worker's exit status when it could not connect and so never read a request.
WORKER_DID_NOT_START = 75
#: A worker's exit status when the mount went away (it read ENODEV).
WORKER_UNMOUNTED = 0
#: ... and when it was told to stop.
WORKER_STOPPED = 3


def _workers(o: Options) -> int:
    """How many worker processes to start if the server allows multi-conn: one per
    connection (-C, nbdfuse's default 4); none for a single connection, -s, or a server
    reached through a command or a descriptor (one connection only)."""
    if o.single or o.mode not in ADDRESS_MODES or o.connections < 2:
        return 0
    env = os.environ.get(WORKERS_ENV)
    if env is not None:
        try:
            return max(0, min(int(env), o.connections))
        except ValueError:
            return 0
    return o.connections


def _spawn_workers(o: Options, fd: int, ra: int | None, n: int) -> list[
        subprocess.Popen[bytes]]:
    import dataclasses
    import json

    spec = json.dumps({"options": dataclasses.asdict(o), "fd": fd, "readahead": ra,
                       "parent": os.getpid()})
    env = dict(os.environ, **{WORKER_ENV: spec})
    if env.get("PYTHONPATH"):  # relative entries were relative to the old directory
        env["PYTHONPATH"] = os.pathsep.join(
            os.path.join(o.cwd, p) if p else o.cwd for p in env["PYTHONPATH"].split(os.pathsep))
    workers = []
    for _ in range(n):
        try:
            # A session of its own: a Ctrl-C on the terminal reaches the main process only,
            # which stops the workers itself (SIGTERM), one request at a time. It runs in
            # "/": its working directory may be the mountpoint, which it serves.
            p = subprocess.Popen([sys.executable, "-m", "pynbd", "fuse"], pass_fds=[fd],
                                 stdin=subprocess.DEVNULL, start_new_session=True,
                                 cwd="/", env=env)
        except OSError as e:
            print(f"{PROG}: cannot start a worker process: {_errmsg(e)}", file=sys.stderr)
            break
        workers.append(p)
    return workers


def _signal(p: subprocess.Popen[bytes], sig: int) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)


async def _watch_workers(workers: list[subprocess.Popen[bytes]]) -> tuple[str, int]:
    """Resolves when a worker ends while the mount is live, with why and the exit status
    for the tool: (unmounted, 0) when it saw the mount go away; an error when it died (the
    requests it had taken were failed by the kernel) or when none could connect."""
    started = len(workers)
    while True:
        for p in list(workers):
            rc = p.poll()
            if rc is None:
                continue
            if rc == WORKER_UNMOUNTED:
                return "unmounted", 0
            if rc == WORKER_DID_NOT_START:
                workers.remove(p)
                if not workers and started:
                    return "no worker process could start (see above); stopping", 1
                continue
            return f"a worker process exited ({rc}); stopping", 1
        await asyncio.sleep(0.05)


async def _reap_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 3 * RELEASE_TIMEOUT
    for p in workers:
        _signal(p, signal.SIGTERM)
    for p in workers:
        while p.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if p.poll() is None:
            p.kill()
            p.wait()


def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the main process dies (even by SIGKILL): its copy of the
    device must not keep a mount alive that nobody manages."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _connect_blocking(o: Options) -> Any:
    """A worker's connection: blocking calls, simple replies (no event loop)."""
    from pynbd.client.blocking import BlockingConnection

    return BlockingConnection.connect(structured=False, meta_contexts=(), **_address(o))


def _connect_until_stopped(o: Options, stopping: list[bool]) -> Any:
    """Connect in a thread while this (main) thread watches for a stop: a signal handler
    never has to interrupt a handshake (raising from it could land inside an import or a
    finalizer, where the exception is lost). None if told to stop or if it failed (said)."""
    import threading

    result: list[Any] = []

    def run() -> None:
        try:
            result.append(_connect_blocking(o))
        except Exception as e:  # noqa: BLE001 - reported below
            result.append(e)

    t = threading.Thread(target=run, name="pynbd-fuse-connect", daemon=True)
    t.start()
    while t.is_alive() and not stopping[0]:
        t.join(0.05)
    if not result:  # stopped while connecting: the daemon thread dies with the process
        return None
    r = result[0]
    if isinstance(r, Exception):
        print(f"{PROG}: {_describe(o)}: {_errmsg(r)}", file=sys.stderr)
        return None
    if stopping[0]:
        r.close()
        return None
    return r


def serve_worker(spec: dict[str, Any]) -> int:
    """A worker process (:mod:`pynbd.tools._fuse_sync`): serve a clone of the FUSE device it
    was handed until the mount goes away or it is told to stop (SIGTERM from the main
    process), then flush and disconnect."""
    from pynbd.errors import CommandError
    from pynbd.tools import _fuse_sync as fs

    o = Options(**spec["options"])
    fd = int(spec["fd"])
    _die_with_parent(int(spec["parent"]))
    stopping = [False, False]  # stop asked for; waiting (where the signal may interrupt)
    fs.install_stop_handler(stopping, RELEASE_TIMEOUT)
    try:
        dev_fd = fs.clone_device(fd)
    except OSError as e:
        print(f"{PROG}: cannot clone the FUSE device: {_errmsg(e)}", file=sys.stderr)
        return WORKER_DID_NOT_START
    finally:
        os.close(fd)
    try:
        conn = _connect_until_stopped(o, stopping)
        if conn is None:
            return WORKER_DID_NOT_START
        f = NbdFile(o, conn)
        dev = fk.FuseDevice(dev_fd, max_readahead=spec.get("readahead"))
        f.ch = dev
        why = fs.serve(f, dev, conn, stopping)
        f.debug(f"worker {os.getpid()}: {why}")
        if not f.readonly and f.can_flush and conn.failure is None:
            fs.arm(RELEASE_TIMEOUT)
            try:
                conn.flush()
            except (OSError, CommandError) as e:
                print(f"{PROG}: flush at unmount: {_errmsg(e)}", file=sys.stderr)
        fs.disarm()
        conn.close()
        return WORKER_UNMOUNTED if why == "unmounted" else WORKER_STOPPED
    finally:
        os.close(dev_fd)


async def _close(nbd: Any, responsive: bool) -> None:
    """Disconnect and stop a server we started; a server that does not answer any more is
    cut off rather than waited for."""
    if responsive:
        try:
            await asyncio.wait_for(nbd.close(), RELEASE_TIMEOUT)
            return
        except TimeoutError:
            print(f"{PROG}: the server did not answer; closing the connection",
                  file=sys.stderr)
        except Exception as e:  # noqa: BLE001
            msg = _errmsg(e)
            if "closed" not in msg:
                print(f"{PROG}: close: {msg}", file=sys.stderr)
    clients = list(getattr(nbd, "clients", [nbd]))
    for c in clients:
        c.abort()
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def _until(coro: Coroutine[Any, Any, Any], stop: asyncio.Future[Any]) -> Any:
    """Run ``coro`` unless a signal comes first (then cancel it and return None)."""
    task = asyncio.ensure_future(coro)
    await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    return None


def _run(o: Options, ready: Any = None) -> int:
    try:
        return asyncio.run(serve(o, ready))
    except KeyboardInterrupt:
        return 1


def _background(o: Options) -> int:
    """Fork; the parent exits when the child has mounted (0) or failed (1)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as fp:
            ok = fp.read(1)
        if ok == b"1":
            return 0
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) or 1
    # child
    os.close(r)
    os.setsid()

    def ready() -> None:
        os.write(w, b"1")
        os.close(w)
        if not o.verbose:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)

    code = _run(o, ready)
    os._exit(code)


def main(argv: list[str]) -> int:
    from pynbd.tools import _lifetime

    worker = os.environ.pop(WORKER_ENV, None)
    if worker is not None:
        import json

        return serve_worker(json.loads(worker))
    try:
        parsed = parse_args(argv)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if isinstance(parsed, int):
        return parsed
    o = parsed
    if not os.path.exists("/dev/fuse"):
        print(f"{PROG}: /dev/fuse does not exist: the fuse kernel module is not loaded",
              file=sys.stderr)
        return 1
    with _lifetime.tool():  # a server started for --command or [ CMD ] dies with this process
        if o.background:
            return _background(o)
        return _run(o)
