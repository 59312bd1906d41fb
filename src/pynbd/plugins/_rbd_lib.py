"""A ctypes binding to the parts of librados' and librbd's C API the rbd plugin uses (private).

Why ctypes: librbd's C API (librbd1, ``<rbd/librbd.h>``) is stable across Ceph releases and
loads into any Python, venv or not. Debian's python3-rbd is a Cython module built for the
system interpreter only, and PyPI has no wheel of it.

Data calls are librbd's asynchronous ones (``rbd_aio_*``). Their completions come back to the
asyncio event loop through an eventfd that librbd signals (``rbd_set_image_notification``);
the loop then collects every finished completion at once with ``rbd_poll_io_events``. No
Python code runs in librbd's threads and no thread waits per request.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

from pynbd.errors import CommandError
from pynbd.plugin import completions
from pynbd.plugins._common import settle

__all__ = ["FIXED_OPTIONS", "NBD_ERRNOS", "CephError", "Cluster", "Image", "load_libraries"]

log = logging.getLogger("pynbd.server")

c_void_p = ctypes.c_void_p
c_char_p = ctypes.c_char_p
c_char = ctypes.c_char
c_int = ctypes.c_int
c_uint8 = ctypes.c_uint8
c_uint64 = ctypes.c_uint64
c_size_t = ctypes.c_size_t
c_ssize_t = ctypes.c_ssize_t

#: librbd's event socket types (``<rbd/librbd.h>``).
EVENT_TYPE_EVENTFD = 2
#: rbd_aio_write_zeroes: allocate the zeroed range instead of deallocating it.
WRITE_ZEROES_THICK = 1
#: Completions collected per rbd_poll_io_events call.
POLL_BATCH = 64
#: Set on every connection whatever the configuration says. librbd copies a write's data
#: before rbd_aio_write2 returns (the default): the caller's buffer is free at once, so the
#: server lends the plugin the payload where it was received instead of copying it first.
ZERO_COPY_OPTION = "rbd_disable_zero_copy_writes"
FIXED_OPTIONS = {ZERO_COPY_OPTION: "true"}
#: The errnos NBD has a code for; an error named by the image becomes EIO otherwise.
NBD_ERRNOS = frozenset({errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC,
                        errno.EOVERFLOW, errno.ENOTSUP, errno.ESHUTDOWN, errno.EROFS})
#: A request's end: ``done(None, value)`` or ``done(exception, None)``, on the loop.
_Done = Callable[[BaseException | None, Any], None]
#: The callback rbd_diff_iterate2 calls: (offset, length, exists, arg) -> 0 to go on.
DIFF_CB = ctypes.CFUNCTYPE(c_int, c_uint64, c_size_t, c_int, c_void_p)

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    # librados
    "rados_create2": (c_int, [ctypes.POINTER(c_void_p), c_char_p, c_char_p, c_uint64]),
    "rados_conf_read_file": (c_int, [c_void_p, c_char_p]),
    "rados_conf_parse_env": (c_int, [c_void_p, c_char_p]),
    "rados_conf_set": (c_int, [c_void_p, c_char_p, c_char_p]),
    "rados_conf_get": (c_int, [c_void_p, c_char_p, c_char_p, c_size_t]),
    "rados_connect": (c_int, [c_void_p]),
    "rados_shutdown": (None, [c_void_p]),
    "rados_ioctx_create": (c_int, [c_void_p, c_char_p, ctypes.POINTER(c_void_p)]),
    "rados_ioctx_destroy": (None, [c_void_p]),
    "rados_ioctx_set_namespace": (None, [c_void_p, c_char_p]),
    # librbd
    "rbd_open": (c_int, [c_void_p, c_char_p, ctypes.POINTER(c_void_p), c_char_p]),
    "rbd_open_read_only": (c_int, [c_void_p, c_char_p, ctypes.POINTER(c_void_p), c_char_p]),
    "rbd_close": (c_int, [c_void_p]),
    "rbd_get_size": (c_int, [c_void_p, ctypes.POINTER(c_uint64)]),
    "rbd_metadata_get": (c_int, [c_void_p, c_char_p, c_char_p, ctypes.POINTER(c_size_t)]),
    "rbd_set_image_notification": (c_int, [c_void_p, c_int, c_int]),
    "rbd_poll_io_events": (c_int, [c_void_p, ctypes.POINTER(c_void_p), c_int]),
    "rbd_aio_create_completion": (c_int, [c_void_p, c_void_p, ctypes.POINTER(c_void_p)]),
    "rbd_aio_get_return_value": (c_ssize_t, [c_void_p]),
    "rbd_aio_release": (None, [c_void_p]),
    "rbd_aio_read2": (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p, c_int]),
    "rbd_aio_write2": (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p, c_int]),
    "rbd_aio_writev": (c_int, [c_void_p, c_void_p, c_int, c_uint64, c_void_p]),
    "rbd_aio_discard": (c_int, [c_void_p, c_uint64, c_uint64, c_void_p]),
    "rbd_aio_write_zeroes": (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_int, c_int]),
    "rbd_aio_flush": (c_int, [c_void_p, c_void_p]),
    "rbd_flush": (c_int, [c_void_p]),
    "rbd_diff_iterate2": (c_int, [c_void_p, c_char_p, c_uint64, c_uint64, c_uint8, c_uint8,
                                  DIFF_CB, c_void_p]),
}

_libs: Any = None


class _IOVec(ctypes.Structure):
    _fields_ = (("iov_base", c_void_p), ("iov_len", c_size_t))


class CephError(Exception):
    """A librados/librbd call failed: ``errno`` and a one-line message."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message


class _Libs:
    """librados and librbd with their function signatures declared."""

    def __init__(self, rados: ctypes.CDLL, rbd: ctypes.CDLL) -> None:
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(rados if name.startswith("rados_") else rbd, name)
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)

    def __getattr__(self, name: str) -> Any:  # for the type checker: set in __init__
        raise AttributeError(name)


def load_libraries() -> Any:
    """librados.so.2 and librbd.so.1, loaded once. CephError(ENOENT) when they are missing."""
    global _libs
    if _libs is None:
        try:
            rados = ctypes.CDLL("librados.so.2")
            rbd = ctypes.CDLL("librbd.so.1")
        except OSError as e:
            raise CephError(errno.ENOENT, f"cannot load librbd: {e} (install librbd1, "
                                          f"Ceph's RADOS block device library)") from None
        _libs = _Libs(rados, rbd)
    return _libs


#: What rados_connect's errors mean.
_CONNECT_ERRORS = {
    errno.ETIMEDOUT: "no monitor answered (is the cluster up? see timeout=)",
    errno.ENOENT: "no key for the user (see keyring=)",
    errno.EACCES: "the monitors refused the user's key (see keyring=)",
    errno.EPERM: "the monitors refused the user's key (see keyring=)",
}


def _strerror(r: int) -> str:
    return os.strerror(-r) if r < 0 else "unknown error"


def _b(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


class Cluster:
    """A connection to a Ceph cluster (``rados_t``) and one pool's I/O context in it."""

    def __init__(self, cluster: str, user: str, conf: str | None, keyring: str | None,
                 options: dict[str, str]) -> None:
        self.lib = load_libraries()
        self.handle = c_void_p()
        self.name = cluster
        self.user = user if "." in user else f"client.{user}"
        self._ioctxs: list[c_void_p] = []
        r = self.lib.rados_create2(ctypes.byref(self.handle), _b(cluster), _b(self.user), 0)
        if r < 0:
            raise CephError(-r, f"cannot create a cluster handle for {self.user}: "
                                f"{_strerror(r)}")
        try:
            self._configure(conf, keyring, options)
            if not self.get("mon_host"):
                raise CephError(errno.ENOENT, "no monitor address (mon host) in the Ceph "
                                              "configuration" + self._found)
            r = self.lib.rados_connect(self.handle)
            if r < 0:
                raise CephError(-r, f"cannot connect to cluster '{cluster}' as {self.user}: "
                                    f"{_CONNECT_ERRORS.get(-r) or _strerror(r)}")
        except BaseException:
            self.lib.rados_shutdown(self.handle)
            raise

    def _configure(self, conf: str | None, keyring: str | None,
                   options: dict[str, str]) -> None:
        lib = self.lib
        r = lib.rados_conf_read_file(self.handle, _b(conf))
        if r < 0 and conf is not None:
            raise CephError(-r, f"cannot read Ceph configuration {conf}: {_strerror(r)}")
        self._found = " (no configuration file found: see conf=)" if r < 0 else ""
        lib.rados_conf_parse_env(self.handle, None)
        settings = {**options, **FIXED_OPTIONS}
        if keyring is not None:
            settings["keyring"] = keyring
        for key, value in settings.items():
            r = lib.rados_conf_set(self.handle, _b(key), _b(value))
            if r < 0:
                raise CephError(-r, f"cannot set Ceph option {key}={value}: {_strerror(r)}")

    def get(self, option: str) -> str:
        """A configuration value ("" if unset)."""
        buf = ctypes.create_string_buffer(4096)
        r = self.lib.rados_conf_get(self.handle, _b(option), buf, len(buf))
        return buf.value.decode(errors="replace") if r >= 0 else ""

    def open_pool(self, pool: str, namespace: str | None) -> c_void_p:
        io = c_void_p()
        r = self.lib.rados_ioctx_create(self.handle, _b(pool), ctypes.byref(io))
        if r < 0:
            what = "does not exist" if r == -errno.ENOENT else _strerror(r)
            raise CephError(-r, f"pool '{pool}' {what}")
        if namespace:
            self.lib.rados_ioctx_set_namespace(io, _b(namespace))
        self._ioctxs.append(io)
        return io

    def close(self) -> None:
        """Destroy the pool contexts and disconnect (blocking: joins librados' threads)."""
        for io in self._ioctxs:
            self.lib.rados_ioctx_destroy(io)
        self._ioctxs.clear()
        if self.handle:
            self.lib.rados_shutdown(self.handle)
            self.handle = c_void_p()


class Image:
    """An open RBD image; its asynchronous calls complete on an asyncio event loop.

    ``submit_*`` must be called on the loop thread; each returns a future that the loop
    resolves with librbd's return value (or an OSError carrying its errno).
    """

    def __init__(self, cluster: Cluster, io: c_void_p, name: str, snap: str | None,
                 readonly: bool) -> None:
        self.lib = lib = cluster.lib
        self.handle = c_void_p()
        self.name = name
        opener = lib.rbd_open_read_only if readonly or snap else lib.rbd_open
        r = opener(io, _b(name), ctypes.byref(self.handle), _b(snap))
        if r < 0:
            if r == -errno.ENOENT:
                what = f"image '{name}'" + (f" snapshot '{snap}'" if snap else "")
                raise CephError(errno.ENOENT, f"{what} does not exist")
            raise CephError(-r, f"cannot open image '{name}': {_strerror(r)}")
        self._efd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, tuple[_Done, Any, int, int]] = {}
        self._polled = (c_void_p * POLL_BATCH)()
        self._comp = c_void_p()  # where rbd_aio_create_completion puts a new completion
        self._comp_ref = ctypes.byref(self._comp)
        # the calls made per request, looked up once
        self._create, self._release = lib.rbd_aio_create_completion, lib.rbd_aio_release
        self._get_value, self._poll = lib.rbd_aio_get_return_value, lib.rbd_poll_io_events
        self._read, self._write = lib.rbd_aio_read2, lib.rbd_aio_write2
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            r = lib.rbd_set_image_notification(self.handle, self._efd, EVENT_TYPE_EVENTFD)
            if r < 0:
                raise CephError(-r, f"cannot set up completion events: {_strerror(r)}")
            #: librbd copies a write's data as it takes it (FIXED_OPTIONS), unless the
            #: image's own metadata says otherwise: then start_write copies it first.
            self.copies_writes = self._metadata(f"conf_{ZERO_COPY_OPTION}") in (
                None, "true", "1", "yes", "on")
        except BaseException:
            self.close()
            raise

    def size(self) -> int:
        size = c_uint64()
        r = self.lib.rbd_get_size(self.handle, ctypes.byref(size))
        if r < 0:
            raise CommandError(-r, f"rbd_get_size: {_strerror(r)}")
        return size.value

    def _metadata(self, key: str) -> str | None:
        """The image's metadata value for ``key`` (lower case), None if it has none."""
        size = c_size_t(256)
        buf = ctypes.create_string_buffer(size.value)
        r = self.lib.rbd_metadata_get(self.handle, _b(key), buf, ctypes.byref(size))
        if r == -errno.ERANGE and size.value > len(buf):
            buf = ctypes.create_string_buffer(size.value)
            r = self.lib.rbd_metadata_get(self.handle, _b(key), buf, ctypes.byref(size))
        if r < 0:
            return None
        return buf.value.decode(errors="replace").strip().lower()

    # Completions on the event loop -----------------------------------------------------
    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            old = self._loop
            if old is not None and not old.is_closed():
                old.remove_reader(self._efd)
            loop.add_reader(self._efd, self._collect)
            self._loop = loop
        return loop

    def _collect(self) -> None:
        """On the loop, when librbd signalled the eventfd: finish every completed request
        (``done(None, value)``, or ``done(OSError, None)``: see :meth:`_pend`)."""
        # hot path: once per wake-up, a few lines per request: benchmarks/ceph.py
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        pending, poll, handle = self._pending, self._poll, self.handle
        polled: Any = self._polled
        get_value, release = self._get_value, self._release
        with completions():  # the server answers them all at the end
            while True:
                n = poll(handle, polled, POLL_BATCH)
                for i in range(max(n, 0)):
                    comp = polled[i]  # the completion's address: its key in _pending
                    r = get_value(comp)
                    release(comp)
                    entry = pending.pop(comp, None)
                    if entry is None:
                        continue
                    done, value, offset, count = entry
                    try:
                        if r < 0:
                            done(_error(-r, offset, count, value), None)
                        elif value is None:
                            done(None, r)
                        elif r == count:
                            done(None, value)
                        else:
                            done(OSError(errno.EIO, f"short read ({r} of {count} bytes)"), None)
                    except Exception:  # one caller's failure must not stop the others
                        log.exception("rbd: a completion callback failed")
                if n < POLL_BATCH:
                    return

    def _completion(self) -> int:
        """A new completion's address (attached to the running loop at first use)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._attach()
        r = self._create(None, None, self._comp_ref)
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        comp: int = self._comp.value  # type: ignore[assignment]
        return comp

    def _pend(self, r: int, comp: int, done: _Done, value: Any, offset: int = -1,
              count: int = 0) -> None:
        """After a submission returned ``r``: wait for its completion, or raise OSError.
        ``value`` None: ``done(None, librbd's return value)``; else the bytearray read into,
        ``done(None, value)`` once librbd read all of it. ``offset`` >= 0: an error names
        the request ("rbd write at OFFSET (COUNT bytes): ...")."""
        if r < 0:
            self._release(comp)
            raise _error(-r, offset, count, value)
        self._pending[comp] = (done, value, offset, count)

    def start_read(self, buf: bytearray, offset: int, done: _Done, named: bool = True) -> None:
        """Read into ``buf`` on the loop; ``done(None, buf)`` when it is full, or
        ``done(OSError, None)`` (its message names the request if ``named``)."""
        n = len(buf)
        comp = self._completion()
        r = self._read(self.handle, offset, n, (ctypes.c_char * n).from_buffer(buf), comp, 0)
        self._pend(r, comp, done, buf, offset if named else -1, n)

    def start_write(self, buf: Any, offset: int, done: _Done, named: bool = True) -> None:
        """Write ``buf`` on the loop; ``done(None, n)`` or ``done(OSError, None)`` (its
        message names the request if ``named``) once it is written. librbd has copied
        ``buf`` when this returns (rbd_disable_zero_copy_writes is always set,
        :data:`FIXED_OPTIONS`; or this copies it first): the caller may reuse it at once."""
        # hot path: once per WRITE: benchmarks/ceph.py
        n = len(buf)
        if not self.copies_writes:  # librbd uses the data until the write is over
            whole = getattr(buf, "obj", buf)  # a memoryview of all of a bytes: that bytes
            cbuf: Any = whole if type(whole) is bytes and len(whole) == n else bytes(buf)
            done = functools.partial(_holding, cbuf, done)
        else:
            try:
                cbuf = (c_char * n).from_buffer(buf)
            except (TypeError, ValueError):  # read-only: a bytes, or a view of one
                whole = getattr(buf, "obj", buf)
                cbuf = whole if type(whole) is bytes and len(whole) == n else bytes(buf)
        loop = self._loop
        if loop is None or loop.is_closed():
            self._attach()
        r = self._create(None, None, self._comp_ref)
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        comp: int = self._comp.value  # type: ignore[assignment]
        r = self._write(self.handle, offset, n, cbuf, comp, 0)
        if r < 0:
            self._release(comp)
            raise _error(-r, offset if named else -1, n, None)
        self._pending[comp] = (done, None, offset if named else -1, n)

    def start_writev(self, bufs: list[Any], offset: int, done: _Done) -> None:
        """:meth:`start_write` of ``bufs`` one after the other from ``offset``, in one
        librbd request (rbd_aio_writev copies them before it returns, as rbd_aio_write2)."""
        n = sum(len(b) for b in bufs)
        if not self.copies_writes or len(bufs) == 1:
            return self.start_write(b"".join(bufs) if len(bufs) > 1 else bufs[0], offset, done)
        iov = (_IOVec * len(bufs))()
        try:
            arrays = [(c_char * len(b)).from_buffer(b) for b in bufs]
        except (TypeError, ValueError):  # read-only: a bytes, or a view of one
            arrays = [ctypes.create_string_buffer(bytes(b), len(b)) for b in bufs]
        for i, a in enumerate(arrays):
            iov[i].iov_base = ctypes.addressof(a)
            iov[i].iov_len = len(a)
        comp = self._completion()
        r = self.lib.rbd_aio_writev(self.handle, iov, len(bufs), offset, comp)
        if r < 0:
            self._release(comp)
            raise _error(-r, offset, n, None)
        self._pending[comp] = (done, None, offset, n)
        return None

    def _submit(self, call: Callable[[int], int]) -> asyncio.Future[int]:
        """Submit ``call(completion)``: a future of librbd's return value."""
        fut: asyncio.Future[int] = self._attach().create_future()
        comp = self._completion()
        self._pend(call(comp), comp, functools.partial(settle, fut), None)
        return fut

    def _future(self, start: Callable[..., None], *args: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._attach().create_future()
        start(*args, functools.partial(settle, fut), named=False)
        return fut

    def submit_read(self, buf: bytearray, offset: int) -> asyncio.Future[bytearray]:
        return self._future(self.start_read, buf, offset)

    def submit_write(self, buf: Any, offset: int) -> asyncio.Future[int]:
        return self._future(self.start_write, buf, offset)

    def submit_discard(self, offset: int, length: int) -> asyncio.Future[int]:
        return self._submit(lambda c: self.lib.rbd_aio_discard(self.handle, offset, length, c))

    def submit_write_zeroes(self, offset: int, length: int,
                            thick: bool) -> asyncio.Future[int]:
        flags = WRITE_ZEROES_THICK if thick else 0
        return self._submit(lambda c: self.lib.rbd_aio_write_zeroes(
            self.handle, offset, length, c, flags, 0))

    def submit_flush(self) -> asyncio.Future[int]:
        return self._submit(lambda c: self.lib.rbd_aio_flush(self.handle, c))

    # Blocking calls (worker threads) ---------------------------------------------------
    def allocated(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The allocated (offset, length) ranges in [offset, offset+length), ascending, from
        rbd_diff_iterate2 against the image's creation (parents included)."""
        found: list[tuple[int, int]] = []

        def seen(off: int, n: int, exists: int, _arg: Any) -> int:
            if exists:
                found.append((off, n))
            return 0

        cb = DIFF_CB(seen)
        r = self.lib.rbd_diff_iterate2(self.handle, None, offset, length, 1, 0, cb, None)
        if r < 0:
            raise OSError(-r, f"rbd_diff_iterate2: {_strerror(r)}")
        found.sort()
        return found

    def close(self) -> None:
        """Close the image (flushing librbd's cache). Blocking; never on the event loop."""
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed() and self._efd >= 0:
            try:
                loop.remove_reader(self._efd)
            except RuntimeError:  # the loop is running in another thread
                loop.call_soon_threadsafe(loop.remove_reader, self._efd)
        if self.handle:
            self.lib.rbd_close(self.handle)
            self.handle = c_void_p()
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
        pending, self._pending = self._pending, {}
        if pending and loop is not None and not loop.is_closed():
            e = OSError(errno.ESHUTDOWN, "image closed")
            for done, *_ in pending.values():
                loop.call_soon_threadsafe(done, e, None)


def _error(err: int, offset: int, count: int, value: Any) -> OSError:
    """librbd's ``-err`` as an OSError; naming the request (and its errno one NBD has)
    when ``offset`` >= 0."""
    if offset < 0:
        return OSError(err, os.strerror(err))
    what = "write" if value is None else "read"
    code = err if err in NBD_ERRNOS else errno.EIO
    return OSError(code, f"rbd {what} at {offset} ({count} bytes): {os.strerror(err)}")


def _holding(data: bytes, done: _Done, err: BaseException | None, value: Any) -> None:
    """``done``, keeping ``data`` (what librbd writes from) until the write is over."""
    done(err, value)
