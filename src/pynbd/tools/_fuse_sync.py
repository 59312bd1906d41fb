"""``pynbd fuse`` worker processes that answer one request at a time in blocking calls.

With a server that allows multi-conn, ``pynbd fuse`` starts worker processes, each with its
own NBD connection (:class:`pynbd.client.blocking.BlockingConnection`). A worker has no event
loop: it reads a request from its own clone of the FUSE device (``FUSE_DEV_IOC_CLONE``) in a
blocking ``read``, sends the NBD request, receives the reply and writes the FUSE reply —
four system calls and a few lines of Python per request, as libfuse's threads do it in
nbdfuse. The kernel wakes one blocked reader per request, so the workers share the requests
without a thundering herd, and a request a worker took is failed by the kernel (never left
hanging) if the worker dies.

The connection is negotiated without structured replies: a read's data follows its 16-byte
simple reply header, which is exactly the size of the FUSE reply header, so header and data
are received in one call into the buffer the FUSE reply is then written from.

The main process mounts, starts the workers, and unmounts when they are done.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import struct
from typing import Any

from pynbd.client.blocking import BlockingConnection, ServerGone
from pynbd.errors import CommandError
from pynbd.tools import _fuse_kernel as fk

__all__ = ["clone_device", "serve"]

#: _IOR(229, 0, uint32_t): attach a new /dev/fuse descriptor to an existing connection.
FUSE_DEV_IOC_CLONE = 0x8004E500
_OUT = fk.OUT_HEADER  # len error unique: 16 bytes, as a simple NBD reply's header


class _Stop(Exception):
    """Raised by the signal handler while the worker waits for a request."""


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


def _errno(fn: Any, *args: Any) -> int:
    """Run one command: 0, or the errno the server answered."""
    try:
        fn(*args)
    except CommandError as e:
        return e.errno
    return 0


def serve(f: Any, dev: fk.FuseDevice, conn: BlockingConnection, stopping: list[bool]) -> str:
    """Answer requests on ``dev`` until the mount goes away (returns why) or a signal says
    stop (``_Stop`` from the handler while waiting, or ``stopping[0]`` set). ``f`` is the
    tool's NbdFile: its rules (size, read-only, what fallocate becomes) and its answers to
    everything that is not data."""
    fd = dev.fd
    buf = bytearray(fk.READ_BUFFER)
    bufs = [buf]  # (nothing is allocated between raising the waiting flag and the read)
    view = memoryview(buf)
    hdr_size = fk.HDR
    in_header = fk.IN_HEADER.unpack_from
    rview = memoryview(bytearray(_OUT.size + fk.MAX_WRITE))
    waiting = stopping  # [stop requested, waiting for a request]
    while not waiting[0]:
        waiting[1] = True
        try:
            if waiting[0]:
                break
            n = os.readv(fd, bufs)
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
                _read(f, dev, conn, rview, view, unique)
            elif opcode == fk.WRITE:
                _write(f, dev, conn, view, unique)
            elif opcode in (fk.FSYNC, fk.FSYNCDIR):
                _fsync(f, dev, conn, unique)
            elif opcode == fk.FALLOCATE:
                _fallocate(f, dev, conn, view, unique)
            elif opcode == fk.INIT:
                dev.answer_init(unique, view[hdr_size:n])
            elif opcode in (fk.FORGET, fk.BATCH_FORGET, fk.INTERRUPT):
                pass
            else:
                f.handle_meta(opcode, unique, nodeid, view[hdr_size:n])
        except OSError as e:  # ServerGone among them
            # The server went away (or broke the protocol): this and every later data
            # request is EIO; the mount stays answerable.
            if conn.failure is None:
                conn.failure = ServerGone(str(e))
            f.reply_failure(unique, e)
    return "stopped"


def _read(f: Any, dev: fk.FuseDevice, conn: BlockingConnection, rview: memoryview,
          view: memoryview, unique: int) -> None:
    """READ: the data is received right behind the FUSE reply header in ``rview``."""
    _, offset, count, _, _, _, _ = fk.READ_IN.unpack_from(view, fk.HDR)
    if f.o.verbose:
        f.debug(f"read: count={count}, offset={offset}")
    size = f.size
    if offset >= size:
        dev.reply(unique)
        return
    count = min(count, size - offset, fk.MAX_WRITE)
    err = _errno(conn.pread_simple, rview, offset, count)
    if err:
        dev.reply_error(unique, err)
        return
    _OUT.pack_into(rview, 0, _OUT.size + count, 0, unique)
    dev.reply_raw(rview[:_OUT.size + count])


def _write(f: Any, dev: fk.FuseDevice, conn: BlockingConnection, view: memoryview,
           unique: int) -> None:
    """WRITE: sent from the request buffer as it is."""
    hdr_size = fk.HDR
    _, offset, count, _, _, _, _ = fk.WRITE_IN.unpack_from(view, hdr_size)
    if f.o.verbose:
        f.debug(f"write: count={count}, offset={offset}")
    if f.readonly:
        dev.reply_error(unique, errno.EACCES)
        return
    n_ok = f.write_length(offset, count)
    if n_ok <= 0:
        dev.reply_error(unique, -n_ok)
        return
    start = hdr_size + fk.WRITE_IN.size
    err = _errno(conn.pwrite, view[start:start + n_ok], offset)
    if err:
        dev.reply_error(unique, err)
    else:
        dev.reply(unique, fk.WRITE_OUT.pack(n_ok, 0))


def _fsync(f: Any, dev: fk.FuseDevice, conn: BlockingConnection, unique: int) -> None:
    """FSYNC, FSYNCDIR: a flush, when the server can."""
    f.debug("fsync")
    err = 0
    if not f.readonly and f.can_flush:
        err = _errno(conn.flush)
    dev.reply_error(unique, err) if err else dev.reply(unique)


def _fallocate(f: Any, dev: fk.FuseDevice, conn: BlockingConnection, view: memoryview,
               unique: int) -> None:
    """FALLOCATE: the tool's plan for the mode, carried out in steps."""
    _, offset, length, mode, _ = fk.FALLOCATE_IN.unpack_from(view, fk.HDR)
    f.debug(f"fallocate: mode={mode}, offset={offset}, len={length}")
    plan = f.fallocate_plan(mode, offset, length)
    if isinstance(plan, int):
        dev.reply_error(unique, plan)
        return
    op, end = plan
    err = 0
    for pos, cnt in f.fallocate_steps(op, offset, end):
        if op == "write":
            err = _errno(conn.pwrite, bytes(cnt), pos)
        else:
            err = _errno(conn.trim if op == "trim" else conn.zero, cnt, pos)
        if err:
            break
    dev.reply_error(unique, err) if err else dev.reply(unique)


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
