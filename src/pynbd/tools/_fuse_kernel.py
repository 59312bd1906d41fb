"""The Linux FUSE kernel protocol, spoken straight over ``/dev/fuse`` with asyncio.

This is the part of ``pynbd fuse`` that libfuse is in nbdfuse: mounting (``mount(2)`` as root,
``fusermount3`` otherwise, exactly as libfuse does), reading requests from the FUSE device and
writing replies. Only what a one-file filesystem needs is here: the request layouts are those of
``include/uapi/linux/fuse.h`` (protocol 7.31, which every kernel since 5.4 speaks); anything
else is answered ENOSYS, which the kernel remembers and stops asking.

The hot path follows the server's rules: the device is non-blocking and read into one
preallocated buffer until it is empty; each reply is one ``writev`` of header + payload.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable
from typing import Any

__all__ = [
    "FuseChannel",
    "FuseDevice",
    "MountError",
    "mount",
    "unmount",
]

# ----------------------------------------------------------------------------------------
# include/uapi/linux/fuse.h
KERNEL_MAJOR = 7
KERNEL_MINOR = 31  # what we speak; the kernel adapts to an older minor

LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
GETXATTR = 22
LISTXATTR = 23
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
ACCESS = 34
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43

# INIT flags
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
MAX_PAGES = 1 << 22

# open_out flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# setattr valid bits
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3

# fallocate modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

IN_HEADER = struct.Struct("=IIQQIIII")  # len opcode unique nodeid uid gid pid padding
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")  # fuse_attr (88 bytes)
ENTRY_OUT = struct.Struct("=QQQQII" + ATTR.format[1:])  # nodeid gen entry/attr valid + attr
ATTR_OUT = struct.Struct("=QII" + ATTR.format[1:])  # attr_valid nsec dummy + attr
OPEN_OUT = struct.Struct("=QII")  # fh open_flags padding
INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags
INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")  # 64 bytes
READ_IN = struct.Struct("=QQIIQII")  # fh offset size flags lock_owner flags padding
WRITE_IN = READ_IN  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("=II")
FALLOCATE_IN = struct.Struct("=QQQII")  # fh offset length mode padding
SETATTR_VALID = struct.Struct("=IIQQ")  # valid padding fh size (start of fuse_setattr_in)
DIRENT = struct.Struct("=QQII")  # ino off namelen type
STATFS_OUT = struct.Struct("=QQQQQIIII24x")  # kstatfs, 80 bytes

HDR = IN_HEADER.size  # 40
DT_DIR = 4
DT_REG = 8

#: Largest WRITE the kernel may send and READ it may ask for (1 MiB; the kernel's own ceiling
#: is 256 pages, FUSE_MAX_MAX_PAGES). Bigger requests mean fewer round trips for large I/O.
MAX_WRITE = 1 << 20
#: The device read buffer: one request with its headers (the kernel refuses smaller reads).
READ_BUFFER = MAX_WRITE + 4096
#: Async requests (readahead, async direct I/O) the kernel may have outstanding at once (its
#: default, 12, starves a server that answers in parallel).
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2


class MountError(Exception):
    """The mount or unmount failed (message is ready to print)."""


# ----------------------------------------------------------------------------------------
# mounting
_libc: Any = None


def _get_libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _direct() -> bool:
    """mount(2)/umount2(2) ourselves (root), or go through fusermount3 (anyone; also root
    with PYNBD_FUSE_FUSERMOUNT=1, which the tests use to cover that path)."""
    return os.geteuid() == 0 and os.environ.get("PYNBD_FUSE_FUSERMOUNT") != "1"


def mount(mountpoint: str, *, root_mode: int, fsname: str, subtype: str,
          options: list[str], read_only: bool) -> int:
    """Mount a FUSE filesystem at ``mountpoint`` and return the FUSE device descriptor
    (non-blocking, close-on-exec). ``root_mode`` is the root's type and permissions
    (``S_IFDIR | 0o755``, or ``S_IFREG | ...`` to mount over a regular file). ``options`` are
    the FUSE mount options (``allow_other``, ``default_permissions``, ``max_read=N``).
    As root ``mount(2)`` is called directly, otherwise through ``fusermount3`` (libfuse's
    order)."""
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse does not exist: the fuse kernel module is not loaded")
    if _direct():
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        data = ",".join([f"fd={fd}", f"rootmode={root_mode:o}", f"user_id={os.getuid()}",
                         f"group_id={os.getgid()}", *options])
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
        libc = _get_libc()
        r = libc.mount(fsname.encode(), os.fsencode(mountpoint),
                       f"fuse.{subtype}".encode(), ctypes.c_ulong(flags), data.encode())
        if r != 0:
            e = ctypes.get_errno()
            os.close(fd)
            raise MountError(f"mount: {mountpoint}: {os.strerror(e)}")
    else:
        fd = _fusermount(mountpoint, fsname, subtype, options, read_only)
    os.set_blocking(fd, False)
    return fd


def _fusermount(mountpoint: str, fsname: str, subtype: str, options: list[str],
                read_only: bool) -> int:
    prog = shutil.which("fusermount3")
    if prog is None:
        raise MountError("fusermount3 not found (Debian: apt-get install fuse3); "
                         "it is needed to mount as a non-root user")
    opts = ",".join(["ro" if read_only else "rw", "nosuid", "nodev", f"fsname={fsname}",
                     f"subtype={subtype}", *options])
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        try:
            p = subprocess.run([prog, "-o", opts, "--", mountpoint], env=env,
                               pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, check=False)
        finally:
            theirs.close()
        if p.returncode != 0:
            msg = (p.stderr or "").strip().splitlines()
            raise MountError(msg[-1] if msg else f"fusermount3 exited {p.returncode}")
        _, fds, _, _ = socket.recv_fds(mine, 1, 1)
        if not fds:
            raise MountError("fusermount3 did not pass the FUSE device")
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        mine.close()


def unmount(mountpoint: str) -> None:
    """Detach the mount (lazily, as libfuse does: files still open see errors, not a hang).
    A mount that is already gone is not an error."""
    if _direct():
        r = _get_libc().umount2(os.fsencode(mountpoint), MNT_DETACH)
        if r != 0:
            e = ctypes.get_errno()
            if e not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point any more
                raise MountError(f"umount: {mountpoint}: {os.strerror(e)}")
        return
    prog = shutil.which("fusermount3")
    if prog is None:
        raise MountError("fusermount3 not found: cannot unmount " + mountpoint)
    subprocess.run([prog, "-u", "-q", "-z", "--", mountpoint], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def set_readahead(real: str, nbytes: int) -> str | None:
    """Set the mount's readahead (its backing device's ``read_ahead_kb``), which the FUSE
    INIT reply can only lower below the kernel's 128 KiB. Needs root. Returns None on
    success, else why not. ``real`` is the mountpoint's real path, resolved BEFORE mounting:
    resolving it now would ask this very filesystem and deadlock."""
    dev = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4].replace("\\040", " ") == real and ".pynbd" in line:
                    dev = fields[2]  # the last such line is the top mount
    except OSError as e:
        return str(e)
    if dev is None:
        return "mount not found in /proc/self/mountinfo"
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(max(nbytes // 1024, 0)))
    except OSError as e:
        return f"/sys/class/bdi/{dev}/read_ahead_kb: {e.strerror}"
    return None


# ----------------------------------------------------------------------------------------
# the channel

class FuseDevice:
    """Replies on a FUSE device (``fd``): the ``reply_*`` methods, each one ``writev``, and the
    answer to INIT. Used as it is by a process that reads requests in blocking calls
    (:mod:`pynbd.tools._fuse_sync`); :class:`FuseChannel` adds reading on an event loop."""

    def __init__(self, fd: int, *, max_readahead: int | None = None) -> None:
        self.fd = fd
        self.proto_minor = 0
        self.max_readahead = max_readahead

    def answer_init(self, unique: int, body: memoryview) -> None:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(body, 0)
        if major != KERNEL_MAJOR:
            # An unknown major: answer with ours; the kernel gives up if it cannot speak it.
            self.reply(unique, INIT_OUT.pack(KERNEL_MAJOR, KERNEL_MINOR, 0, 0, 0, 0, 0, 0,
                                             0, 0, 0))
            return
        self.proto_minor = min(minor, KERNEL_MINOR)
        want = flags & (ASYNC_READ | BIG_WRITES | ASYNC_DIO | MAX_PAGES)
        # The kernel takes the smaller of this and the mount's readahead setting (which
        # set_readahead may have raised before this INIT was read).
        ra = max_readahead if self.max_readahead is None else self.max_readahead
        out = INIT_OUT.pack(KERNEL_MAJOR, self.proto_minor, ra, want, MAX_BACKGROUND,
                            CONGESTION_THRESHOLD, MAX_WRITE, 1, MAX_WRITE // 4096, 0, 0)
        self.reply(unique, out)

    # -- replying
    def reply(self, unique: int, payload: bytes | bytearray | memoryview = b"") -> None:
        self._write([OUT_HEADER.pack(OUT_HEADER.size + len(payload), 0, unique), payload])

    def reply_raw(self, data: bytes | bytearray | memoryview) -> None:
        """A whole reply, its header included, in one write."""
        self._write([data])

    def reply_error(self, unique: int, err: int) -> None:
        self._write([OUT_HEADER.pack(OUT_HEADER.size, -err, unique)])

    def _write(self, parts: list[Any]) -> None:
        if self.fd < 0:
            return
        try:
            os.writev(self.fd, parts)
        except OSError as e:
            # ENOENT: the request was interrupted/aborted; ENODEV: the mount is gone.
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                raise

    # -- helpers for building replies
    @staticmethod
    def attr(ino: int, mode: int, size: int, nlink: int, uid: int, gid: int,
             t: tuple[int, int]) -> tuple[int, ...]:
        sec, nsec = t
        return (ino, size, (size + 511) // 512, sec, sec, sec, nsec, nsec, nsec, mode, nlink,
                uid, gid, 0, 4096, 0)

    def reply_entry(self, unique: int, nodeid: int, attr: tuple[int, ...],
                    valid: float) -> None:
        s, ns = int(valid), int((valid % 1) * 1e9)
        self.reply(unique, ENTRY_OUT.pack(nodeid, 0, s, s, ns, ns, *attr))

    def reply_attr(self, unique: int, attr: tuple[int, ...], valid: float) -> None:
        s, ns = int(valid), int((valid % 1) * 1e9)
        self.reply(unique, ATTR_OUT.pack(s, ns, 0, *attr))

    def reply_open(self, unique: int, flags: int) -> None:
        self.reply(unique, OPEN_OUT.pack(0, flags, 0))

    def reply_dirents(self, unique: int, entries: list[tuple[int, str, int]], offset: int,
                      size: int) -> None:
        """``entries``: (ino, name, dtype); answer from index ``offset`` within ``size``."""
        out = bytearray()
        for i in range(offset, len(entries)):
            ino, name, dtype = entries[i]
            nb = os.fsencode(name)
            rec = DIRENT.pack(ino, i + 1, len(nb), dtype) + nb
            rec += b"\0" * (-len(rec) % 8)
            if len(out) + len(rec) > size:
                break
            out += rec
        self.reply(unique, out)

    def reply_statfs(self, unique: int) -> None:
        self.reply(unique, STATFS_OUT.pack(0, 0, 0, 0, 0, 4096, 255, 4096, 0))


class FuseChannel(FuseDevice):
    """Reads requests from a FUSE device on the running loop and dispatches them.

    ``handler(opcode, unique, nodeid, body)`` is called for each request except INIT (answered
    here), FORGET/BATCH_FORGET and INTERRUPT (no reply is owed). ``body`` is a view of the
    shared read buffer, valid only during the call. The handler must reply with exactly one
    of the ``reply_*`` methods (now or later). :attr:`closed` resolves when the kernel
    connection ends (unmounted or aborted) or :meth:`stop` is called."""

    def __init__(self, fd: int, handler: Callable[[int, int, int, memoryview], None],
                 *, max_readahead: int | None = None,
                 after_batch: Callable[[], None] | None = None) -> None:
        super().__init__(fd, max_readahead=max_readahead)
        self.handler = handler
        self.after_batch = after_batch
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._buf = bytearray(READ_BUFFER)
        self._view = memoryview(self._buf)
        self._reading = False

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.fd, self._on_readable)
        self._reading = True

    def stop(self, why: str = "stopped") -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.fd)
            self._reading = False
        if not self.closed.done():
            self.closed.set_result(why)

    def close(self) -> None:
        self.stop()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- reading
    def _on_readable(self) -> None:
        try:
            self._read_batch()
        finally:
            if self.after_batch is not None:
                self.after_batch()

    def _read_batch(self) -> None:
        view = self._view
        fd = self.fd
        for _ in range(64):  # bounded: let replies and other callbacks run between batches
            if not self._reading:
                return
            try:
                n = os.readv(fd, [self._buf])
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                # ENODEV: unmounted (fusermount3 -u, umount) or the connection was aborted
                self.stop("unmounted" if e.errno == errno.ENODEV else f"read: {e.strerror}")
                return
            if n < HDR:
                continue
            _, opcode, unique, nodeid, _, _, _, _ = IN_HEADER.unpack_from(view, 0)
            body = view[HDR:n]
            if opcode == INIT:
                self.answer_init(unique, body)
            elif opcode in (FORGET, BATCH_FORGET, INTERRUPT):
                pass  # no reply; an interrupt is ignored (the request completes normally)
            else:
                try:
                    self.handler(opcode, unique, nodeid, body)
                except Exception as e:  # noqa: BLE001 (a bug must not take the mount down: EIO)
                    import sys
                    print(f"pynbd fuse: internal error handling opcode {opcode}: {e!r}",
                          file=sys.stderr)
                    self.reply_error(unique, errno.EIO)
