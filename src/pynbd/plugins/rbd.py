"""The rbd plugin: a Ceph RBD image as a disk. Its manual page is :class:`RbdPlugin`'s
docstring."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, Extent, Flag, FuaMode, Plugin, ThreadModel
from pynbd.plugins._rbd_lib import NBD_ERRNOS, CephError, Cluster, Image, load_libraries

__all__ = ["RbdPlugin"]

log = logging.getLogger("pynbd.server")

_FUA = int(Flag.FUA)
_MAY_TRIM = int(Flag.MAY_TRIM)
_FAST_ZERO = int(Flag.FAST_ZERO)
#: Seconds to wait for the monitors when connecting (librados' own default is 300).
DEFAULT_TIMEOUT = 30


class _Handle:
    __slots__ = ("readonly", "wrote")

    def __init__(self, readonly: bool) -> None:
        self.readonly = readonly
        self.wrote = False


class RbdPlugin(Plugin):
    """NAME
        rbd - pynbd rbd plugin (a Ceph RADOS block device image)

    SYNOPSIS
        pynbd serve rbd [image=][POOL/[NAMESPACE/]]IMAGE[@SNAP]
                        [pool=POOL] [namespace=NAMESPACE] [snap=SNAP]
                        [conf=CEPH.CONF] [cluster=NAME] [id=ID | user=ID]
                        [keyring=FILE] [timeout=SECS] [osd-timeout=SECS]

    DESCRIPTION
        rbd serves an RBD image of a Ceph cluster: reads, writes, flush, trim (discard),
        zero (librbd's write_zeroes: a deallocating zero unless the client asks for
        allocated zeroes), extents (the image's allocated ranges, from librbd's
        diff_iterate, so a sparse image shows its holes) and FUA (a write then a flush).

        The server opens one cluster connection and one image handle when it starts, and
        every client shares them: librbd's cache is then one cache, a flush on any
        connection covers the writes of all, and multi-conn is advertised. Many pynbd
        servers on many machines can serve images of one cluster (docs/ceph.md).

        Requests go to librbd's asynchronous calls; their completions come back to the
        server's event loop through an eventfd librbd signals, all that finished at once:
        no thread waits per request. librbd is reached through ctypes (librbd1's stable C
        API), so the plugin runs in any Python environment; nothing else is needed.

        A missing cluster, key, pool, image or snapshot stops the server at start-up with
        one line saying which.

    PARAMETERS
        [image=][POOL/[NAMESPACE/]]IMAGE[@SNAP]
            The image, as the rbd command names it. Required; "image=" may be omitted.

        pool=POOL
            The pool (default: rbd).

        namespace=NAMESPACE
            The RADOS namespace within the pool (default: none).

        snap=SNAP
            Serve this snapshot of the image, read-only.

        conf=CEPH.CONF
            The Ceph configuration file (default: $CEPH_CONF, /etc/ceph/CLUSTER.conf,
            ~/.ceph/CLUSTER.conf, ./CLUSTER.conf). $CEPH_ARGS is read as well.

        cluster=NAME
            The cluster name (default: ceph).

        id=ID
        user=ID
            The Ceph user, with or without "client." (default: admin).

        keyring=FILE
            The keyring holding the user's key (default: the configuration's).

        timeout=SECS
            How long to wait for the monitors (connecting, and each monitor request);
            default 30.

        osd-timeout=SECS
            Fail a request the OSDs have not answered in SECS with EIO instead of waiting
            for them (librados' rados_osd_op_timeout). Default 0: wait, as a disk does.

    EXAMPLES
        Serve rbd/disk of the cluster in /etc/ceph/ceph.conf:

            pynbd serve rbd rbd/disk

        A snapshot, read-only, as user "nbd":

            pynbd serve rbd pool=vms image=web01 snap=before-upgrade id=nbd \\
                keyring=/etc/ceph/ceph.client.nbd.keyring

        Copy a local image into a new RBD image:

            rbd create --size 10G rbd/disk
            pynbd serve -U /tmp/rbd.sock rbd rbd/disk
            qemu-img convert -n -O raw disk.qcow2 nbd+unix:///?socket=/tmp/rbd.sock
    """

    name = "rbd"
    version = "1.0"
    magic_config_key = "image"
    thread_model = ThreadModel.PARALLEL
    config_help = (
        "[image=]<IMAGE>       (required) [POOL/[NAMESPACE/]]IMAGE[@SNAP]\n"
        "pool=<POOL>                      The pool (default rbd).\n"
        "namespace=<NAMESPACE>            The RADOS namespace.\n"
        "snap=<SNAP>                      Serve a snapshot (read-only).\n"
        "conf=<CEPH.CONF>                 Ceph configuration file.\n"
        "cluster=<NAME>                   Cluster name (default ceph).\n"
        "id=<ID>                          Ceph user (default admin).\n"
        "keyring=<FILE>                   Keyring with the user's key.\n"
        "timeout=<SECS>                   Monitor timeout (default 30).\n"
        "osd-timeout=<SECS>               Fail OSD requests after SECS (default: wait)."
    )

    def __init__(self) -> None:
        self.image_name: str | None = None
        self.pool: str | None = None
        self.namespace: str | None = None
        self.snap: str | None = None
        self.conf: str | None = None
        self.cluster_name = "ceph"
        self.user = "admin"
        self.keyring: str | None = None
        self.timeout = DEFAULT_TIMEOUT
        self.osd_timeout = 0
        self._cluster: Cluster | None = None
        self._image: Image | None = None

    # Configuration ---------------------------------------------------------------------
    def config(self, key: str, value: str) -> None:
        if key == "image":
            self._parse_spec(value)
        elif key == "pool":
            self.pool = _nonempty(key, value)
        elif key == "namespace":
            self.namespace = value or None
        elif key == "snap":
            self.snap = _nonempty(key, value)
        elif key == "conf":
            self.conf = _nonempty(key, value)
        elif key == "cluster":
            self.cluster_name = _nonempty(key, value)
        elif key in ("id", "user"):
            self.user = _nonempty(key, value)
        elif key == "keyring":
            self.keyring = _nonempty(key, value)
        elif key == "timeout":
            self.timeout = _seconds(key, value)
        elif key == "osd-timeout":
            self.osd_timeout = _seconds(key, value)
        else:
            raise ConfigError(f"rbd: unknown parameter '{key}'")

    def _parse_spec(self, value: str) -> None:
        """[POOL/[NAMESPACE/]]IMAGE[@SNAP], as the rbd command reads an image spec."""
        spec, at, snap = value.partition("@")
        parts = spec.split("/")
        if len(parts) > 3 or not all(parts) or (at and not snap):
            raise ConfigError(f"rbd: image={value}: expected [POOL/[NAMESPACE/]]IMAGE[@SNAP]")
        self.image_name = parts[-1]
        if len(parts) >= 2:
            self.pool = parts[0]
        if len(parts) == 3:
            self.namespace = parts[1]
        if at:
            self.snap = snap

    def config_complete(self) -> None:
        if not self.image_name:
            raise ConfigError("rbd: you must supply the image parameter after the plugin name "
                              "on the command line")

    def _options(self) -> dict[str, str]:
        opts = {"client_mount_timeout": str(self.timeout),
                "rados_mon_op_timeout": str(self.timeout),
                # Our one line says what failed; librados' own lines would repeat it.
                "err_to_stderr": "false", "log_to_stderr": "false"}
        if self.osd_timeout:
            opts["rados_osd_op_timeout"] = str(self.osd_timeout)
        return opts

    def _connect(self) -> tuple[Cluster, Image]:
        """Connect and open the image (blocking); ConfigError with one line on failure."""
        try:
            load_libraries()
            cluster = Cluster(self.cluster_name, self.user, self.conf, self.keyring,
                              self._options())
        except CephError as e:
            raise ConfigError(f"{self.name}: {e.message}") from None
        try:
            io = cluster.open_pool(self.pool or "rbd", self.namespace)
            image = Image(cluster, io, self.image_name or "", self.snap, readonly=False)
        except CephError as e:
            cluster.close()
            raise ConfigError(f"{self.name}: {e.message}") from None
        return cluster, image

    def get_ready(self) -> None:
        # Check now, while the error can reach the terminal; librados' threads must not
        # cross the fork into the background, so the connection is made again in
        # after_fork (it takes about a tenth of a second).
        cluster, image = self._connect()
        image.close()
        cluster.close()

    def after_fork(self) -> None:
        self._cluster, self._image = self._connect()

    def cleanup(self) -> None:
        image, cluster = self._image, self._cluster
        self._image = self._cluster = None
        if image is not None:
            image.close()
        if cluster is not None:
            cluster.close()

    def dump_plugin(self) -> list[str]:
        return ["rbd_binding=ctypes (librbd.so.1)"]

    # Connection ------------------------------------------------------------------------
    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> _Handle:
        if self._image is None:  # served without after_fork (a server embedded in a program)
            self._cluster, self._image = await asyncio.get_running_loop().run_in_executor(
                None, self._connect)
        return _Handle(readonly or self.snap is not None)

    async def close(self, h: _Handle) -> None:
        # What a client wrote is on the cluster once it has gone, even if it never flushed.
        if h.wrote and self._image is not None:
            try:
                await self._image.submit_flush()
            except OSError as e:
                log.error("%s: flush on disconnect: %s", self.name, e.strerror)

    # Export properties -----------------------------------------------------------------
    def _img(self) -> Image:
        image = self._image
        if image is None:
            raise CommandError(errno.ESHUTDOWN, "the image is closed")
        return image

    def get_size(self, h: _Handle) -> int:
        return self._img().size()

    def can_write(self, h: _Handle) -> bool:
        return not h.readonly

    def can_flush(self, h: _Handle) -> bool:
        return True

    def can_trim(self, h: _Handle) -> bool:
        return True

    def can_zero(self, h: _Handle) -> bool:
        return True

    def can_fast_zero(self, h: _Handle) -> bool:
        return True

    def can_extents(self, h: _Handle) -> bool:
        return True

    def can_fua(self, h: _Handle) -> FuaMode:
        return FuaMode.EMULATE

    def can_multi_conn(self, h: _Handle) -> bool:
        return True  # one image handle, one cache: a flush anywhere covers every write

    # Data ------------------------------------------------------------------------------
    async def pread(self, h: _Handle, count: int, offset: int, flags: int) -> bytearray:
        try:
            return await self._img().submit_read(bytearray(count), offset)
        except OSError as e:
            raise _failed("read", offset, count, e) from None

    async def pwrite(self, h: _Handle, buf: memoryview, offset: int, flags: int) -> None:
        h.wrote = True
        image = self._img()
        try:
            await image.submit_write(buf, offset)
            if flags & _FUA:
                await image.submit_flush()
        except OSError as e:
            raise _failed("write", offset, len(buf), e) from None

    # The event loop's fast path (pynbd.server.coroutines): with the plugin alone in the
    # chain, READ and WRITE go to librbd without a task or a future; the completion calls
    # ``done`` on the loop. librbd has copied a WRITE's data when rbd_aio_write2 returns,
    # so the server lends start_pwrite the payload where it received it.
    start_pwrite_copies = True

    def start_pread(self, h: _Handle, count: int, offset: int, flags: int,
                    done: Callable[[BaseException | None, Any], None]) -> None:
        # an error reaches ``done`` as an OSError naming the request, as _failed would
        self._img().start_read(bytearray(count), offset, done)

    def start_pwrite(self, h: _Handle, buf: memoryview, offset: int, flags: int,
                     done: Callable[[BaseException | None, Any], None]) -> None:
        h.wrote = True
        self._img().start_write(buf, offset, done)

    def start_pwritev(self, h: _Handle, bufs: list[memoryview], offset: int, flags: int,
                      done: Callable[[BaseException | None, Any], None]) -> None:
        # WRITEs one after the other on the disk, received together: one librbd request
        h.wrote = True
        self._img().start_writev(bufs, offset, done)

    async def flush(self, h: _Handle, flags: int) -> None:
        try:
            await self._img().submit_flush()
        except OSError as e:
            raise _failed("flush", 0, 0, e) from None

    async def trim(self, h: _Handle, count: int, offset: int, flags: int) -> None:
        h.wrote = True
        image = self._img()
        try:
            await image.submit_discard(offset, count)
            if flags & _FUA:
                await image.submit_flush()
        except OSError as e:
            raise _failed("discard", offset, count, e) from None

    async def zero(self, h: _Handle, count: int, offset: int, flags: int) -> None:
        thick = not flags & _MAY_TRIM
        if thick and flags & _FAST_ZERO:
            # Allocated zeroes are written (write-same): not fast.
            raise CommandError(errno.ENOTSUP, "allocated zeroes are not fast")
        h.wrote = True
        image = self._img()
        try:
            await image.submit_write_zeroes(offset, count, thick)
            if flags & _FUA:
                await image.submit_flush()
        except OSError as e:
            raise _failed("write_zeroes", offset, count, e) from None

    async def extents(self, h: _Handle, count: int, offset: int, flags: int) -> list[Extent]:
        image = self._img()
        try:
            ranges = await asyncio.get_running_loop().run_in_executor(
                None, image.allocated, offset, count)
        except OSError as e:
            raise _failed("diff_iterate", offset, count, e) from None
        return _extents(ranges, offset, count, bool(flags & int(Flag.REQ_ONE)))


def _extents(ranges: list[tuple[int, int]], offset: int, count: int,
             req_one: bool) -> list[Extent]:
    """Allocated ranges as contiguous extents covering [offset, offset+count): data, and
    holes (reading as zeroes) between."""
    out: list[Extent] = []
    pos, end = offset, offset + count
    hole = EXTENT_HOLE | EXTENT_ZERO
    for start, length in ranges:
        start, stop = max(start, pos), min(start + length, end)
        if stop <= start:
            continue
        if start > pos:
            out.append((pos, start - pos, hole))
        if out and out[-1][2] == 0 and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], stop - out[-1][0], 0)
        else:
            out.append((start, stop - start, 0))
        pos = stop
        if req_one:
            return out
    if pos < end:
        out.append((pos, end - pos, hole))
    return out


def _failed(what: str, offset: int, count: int, e: BaseException) -> CommandError:
    code = getattr(e, "errno", None)
    err = code if code in NBD_ERRNOS else errno.EIO
    where = f" at {offset} ({count} bytes)" if count else ""
    return CommandError(err, f"rbd {what}{where}: {getattr(e, 'strerror', None) or e}")


def _nonempty(key: str, value: str) -> str:
    if not value:
        raise ConfigError(f"rbd: {key}= must not be empty")
    return value


def _seconds(key: str, value: str) -> int:
    if not value.isdigit():
        raise ConfigError(f"rbd: {key}={value}: expected a number of seconds")
    return int(value)
