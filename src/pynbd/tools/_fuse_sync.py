"""``pynbd fuse`` worker processes that answer one request at a time in blocking calls.

With a server that allows multi-conn, ``pynbd fuse`` starts worker processes beside the main
one, each with its own NBD connection. A worker here has no event loop: it reads a request
from its own clone of the FUSE device (``FUSE_DEV_IOC_CLONE``) in a blocking ``read``, sends
the NBD request, receives the reply and writes the FUSE reply — four system calls and a few
lines of Python per request, as libfuse's threads do it in nbdfuse. The kernel wakes one
blocked reader per request, so the workers share the requests without a thundering herd, and
a request a worker took is failed by the kernel (never left hanging) if the worker dies.

Replies are simple NBD replies (the connection is negotiated without structured replies):
a read's data follows its 16-byte header, which is exactly the size of the FUSE reply
header, so the data is received once, into the buffer the FUSE reply is written from.

The main process keeps its event loop: it owns the mount, answers requests too (with many
in flight on its connection: sequential reads with readahead), and stops the workers.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import struct
from typing import Any

from pynbd.protocol.constants import nbd_to_errno
from pynbd.tools import _fuse_kernel as fk

__all__ = ["clone_device", "serve"]

#: _IOR(229, 0, uint32_t): attach a new /dev/fuse descriptor to an existing connection.
FUSE_DEV_IOC_CLONE = 0x8004E500

_REQUEST = struct.Struct(">IHHQQI")  # magic flags type cookie offset length
_REQUEST_MAGIC = 0x25609513
_SIMPLE = struct.Struct(">IIQ")  # magic error cookie
_SIMPLE_MAGIC = 0x67446698
_OUT = fk.OUT_HEADER  # len error unique: also 16 bytes
assert _SIMPLE.size == _OUT.size == 16

_READ, _WRITE, _DISC, _FLUSH, _TRIM, _ZERO = 0, 1, 2, 3, 4, 6


class _Stop(Exception):
    """Raised by the signal handler while the worker waits for a request."""


class ServerGone(ConnectionError):
    pass


class GaveUp(ServerGone):
    """Raised by the alarm when the server has not answered in time after a stop."""


def clone_device(fd: int) -> int:
    """A new descriptor (blocking, close-on-exec) on the FUSE connection of ``fd``. The
    requests read from it are answered on it; the kernel fails them if it is closed first."""
    new = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(new, FUSE_DEV_IOC_CLONE, struct.pack("=I", fd))
    except OSError:
        os.close(new)
        raise
    return new


class Connection:
    """One NBD connection, one command at a time, simple replies, blocking socket."""

    def __init__(self, sock: socket.socket, max_count: int) -> None:
        self.sock = sock
        self.cookie = 0
        #: A read's reply lands at [0:16] (header) and [16:16+count] (data).
        self.buf = bytearray(_SIMPLE.size + max_count)
        self.view = memoryview(self.buf)
        self.failure: BaseException | None = None

    def _send(self, cmd: int, offset: int, count: int, payload: Any = None) -> int:
        self.cookie += 1
        hdr = _REQUEST.pack(_REQUEST_MAGIC, 0, cmd, self.cookie, offset, count)
        if payload is None:
            self.sock.sendall(hdr)
        else:
            parts = [memoryview(hdr), memoryview(payload)]
            while parts:
                n = self.sock.sendmsg(parts)
                while parts and n >= parts[0].nbytes:
                    n -= parts[0].nbytes
                    parts.pop(0)
                if n:
                    parts[0] = parts[0][n:]
        return self.cookie

    def _recv(self, want: int, got: int = 0) -> int:
        """Receive into buf[got:want]; returns ``want``."""
        view, sock = self.view, self.sock
        while got < want:
            n = sock.recv_into(view[got:want])
            if n == 0:
                raise ServerGone("the server closed the connection")
            got += n
        return got

    def _check(self, cookie: int) -> int:
        magic, error, c = _SIMPLE.unpack_from(self.buf, 0)
        if magic != _SIMPLE_MAGIC or c != cookie:
            raise ServerGone("the server sent a reply that does not match the request")
        return nbd_to_errno(error) if error else 0

    def read(self, offset: int, count: int) -> int:
        """Read into buf[16:16+count]; 0 or an errno."""
        cookie = self._send(_READ, offset, count)
        # Only this reply can arrive: ask for all of it; an error reply is the header alone.
        got = self.sock.recv_into(self.view, _SIMPLE.size + count)
        if got == 0:
            raise ServerGone("the server closed the connection")
        got = self._recv(_SIMPLE.size, got)
        err = self._check(cookie)
        if err:
            if got > _SIMPLE.size:
                raise ServerGone("the server sent data with an error reply")
            return err
        self._recv(_SIMPLE.size + count, got)
        return 0

    def command(self, cmd: int, offset: int, count: int, payload: Any = None) -> int:
        """Any other command: 0 or an errno."""
        cookie = self._send(cmd, offset, count, payload)
        self._recv(_SIMPLE.size)
        return self._check(cookie)

    def disconnect(self) -> None:
        try:
            self._send(_DISC, 0, 0)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()


def serve(f: Any, dev: fk.FuseDevice, conn: Connection, stopping: list[bool]) -> str:
    """Answer requests on ``dev`` until the mount goes away (returns why) or a signal says
    stop (``_Stop`` from the handler while waiting, or ``stopping[0]`` set). ``f`` is the
    tool's NbdFile: its rules (size, read-only, what fallocate becomes) and its answers to
    everything that is not data."""
    fd = dev.fd
    buf = bytearray(fk.READ_BUFFER)
    view = memoryview(buf)
    hdr_size = fk.HDR
    read_in = fk.READ_IN.unpack_from
    in_header = fk.IN_HEADER.unpack_from
    out_pack = _OUT.pack_into
    rview = conn.view
    size = f.size
    verbose = f.o.verbose
    waiting = stopping  # [stop requested, waiting for a request]
    while not waiting[0]:
        waiting[1] = True
        try:
            if waiting[0]:
                break
            n = os.readv(fd, [buf])
        except _Stop:
            break
        except OSError as e:
            if e.errno == errno.ENOENT:  # interrupted before it was read
                continue
            return "unmounted" if e.errno == errno.ENODEV else f"read: {e.strerror}"
        finally:
            waiting[1] = False
        if n < hdr_size:
            continue
        _, opcode, unique, nodeid, _, _, _, _ = in_header(view, 0)
        try:
            if opcode == fk.READ:
                _, offset, count, _, _, _, _ = read_in(view, hdr_size)
                if verbose:
                    f.debug(f"read: count={count}, offset={offset}")
                if offset >= size:
                    dev.reply(unique)
                    continue
                count = min(count, size - offset, len(buf) - _SIMPLE.size)
                err = conn.read(offset, count) if conn.failure is None else errno.EIO
                if err:
                    dev.reply_error(unique, err)
                    continue
                out_pack(rview, 0, _OUT.size + count, 0, unique)
                dev.reply_raw(rview[:_OUT.size + count])
            elif opcode == fk.WRITE:
                _, offset, count, _, _, _, _ = fk.WRITE_IN.unpack_from(view, hdr_size)
                if verbose:
                    f.debug(f"write: count={count}, offset={offset}")
                if f.readonly:
                    dev.reply_error(unique, errno.EACCES)
                    continue
                n_ok = f.write_length(offset, count)
                if n_ok <= 0:
                    dev.reply_error(unique, -n_ok)
                    continue
                start = hdr_size + fk.WRITE_IN.size
                err = _command(conn, _WRITE, offset, n_ok, view[start:start + n_ok])
                if err:
                    dev.reply_error(unique, err)
                else:
                    dev.reply(unique, fk.WRITE_OUT.pack(n_ok, 0))
            elif opcode in (fk.FSYNC, fk.FSYNCDIR):
                f.debug("fsync")
                err = 0
                if not f.readonly and f.can_flush:
                    err = _command(conn, _FLUSH, 0, 0)
                dev.reply_error(unique, err) if err else dev.reply(unique)
            elif opcode == fk.FALLOCATE:
                _, offset, length, mode, _ = fk.FALLOCATE_IN.unpack_from(view, hdr_size)
                f.debug(f"fallocate: mode={mode}, offset={offset}, len={length}")
                plan = f.fallocate_plan(mode, offset, length)
                if isinstance(plan, int):
                    dev.reply_error(unique, plan)
                    continue
                op, end = plan
                err = 0
                for pos, cnt in f.fallocate_steps(op, offset, end):
                    if op == "write":
                        err = _command(conn, _WRITE, pos, cnt, bytes(cnt))
                    else:
                        err = _command(conn, _TRIM if op == "trim" else _ZERO, pos, cnt)
                    if err:
                        break
                dev.reply_error(unique, err) if err else dev.reply(unique)
            elif opcode == fk.INIT:
                dev.answer_init(unique, view[hdr_size:n])
            elif opcode in (fk.FORGET, fk.BATCH_FORGET, fk.INTERRUPT):
                pass
            else:
                f.handle_meta(opcode, unique, nodeid, view[hdr_size:n])
        except (OSError, ServerGone) as e:
            # The server went away (or broke the protocol): this and every later data
            # request is EIO; the mount stays answerable.
            if conn.failure is None:
                conn.failure = e
            f.reply_failure(unique, e)
    return "stopped"


def _command(conn: Connection, cmd: int, offset: int, count: int, payload: Any = None) -> int:
    if conn.failure is not None:
        return errno.EIO
    return conn.command(cmd, offset, count, payload)


def install_stop_handler(stopping: list[bool], grace: float) -> None:
    """SIGTERM/SIGINT/SIGHUP: stop after the request in hand. The handler raises only while
    the worker waits for a request, so a request read is always answered; one waiting on
    the server gets ``grace`` seconds (then :class:`GaveUp`, and it is answered EIO)."""

    def on_signal(_sig: int, _frame: Any) -> None:
        stopping[0] = True
        if stopping[1]:
            raise _Stop
        arm(grace)

    def on_alarm(_sig: int, _frame: Any) -> None:
        raise GaveUp(f"the server did not answer in {grace:g} s; giving up")

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)


def arm(seconds: float) -> None:
    """Raise :class:`GaveUp` in ``seconds`` (unless already armed)."""
    if signal.getitimer(signal.ITIMER_REAL)[0] == 0:
        signal.setitimer(signal.ITIMER_REAL, seconds)


def disarm() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
