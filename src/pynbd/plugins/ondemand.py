"""The ondemand plugin: a persistent filesystem per export name, made when a client first
asks for it. Its manual page is :class:`OndemandPlugin`'s docstring."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import parse_bool
from pynbd.plugin import connection
from pynbd.plugins._filesystems_common import log, realpath
from pynbd.plugins._filesystems_mkfs import DiskHandle, MkfsPlugin

__all__ = ["OndemandPlugin"]

#: The longest export name: a file name (NAME_MAX).
NAME_MAX = 255
#: How often a client waiting for a locked filesystem (wait=true) tries again, at most.
LOCK_POLL_MAX = 0.2

# struct flock: l_type, l_whence, l_start, l_len, l_pid (and padding).
_FLOCK = struct.Struct("hhqqi4x")
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def _lock(fd: int, readonly: bool) -> bool:
    """Take an open-file-description lock on the whole file (shared for readers, exclusive
    for writers, compatible with nbdkit's); False if another holds a conflicting one."""
    kind = fcntl.F_RDLCK if readonly else fcntl.F_WRLCK
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


class OndemandPlugin(MkfsPlugin):
    """NAME
        ondemand - pynbd plugin creating filesystems on demand, one per export name

    SYNOPSIS
        pynbd serve ondemand dir=EXPORTSDIR [size=]SIZE [wait=true]
                             { [type=ext4|xfs|vfat|...] [label=LABEL]
                               | command=COMMAND [VAR=VALUE ...] }

    DESCRIPTION
        ondemand keeps one filesystem per export name in EXPORTSDIR. When a client asks for
        an export name that has no file yet, a sparse file of that name is made there and
        formatted with mkfs(8) (ext4 by default); when it asks again, even after the server
        restarted, it gets the same filesystem back. The export name "" is the file
        "default". The files are never deleted by the server.

        Names longer than 255 bytes, or containing ".", "/" or ":", are refused ("invalid
        exportname 'NAME' rejected"). Listing the exports (nbdinfo --list) shows the
        default export and every file of EXPORTSDIR without "." or ":" in its name (so a
        command may keep state in dot-files there).

        A filesystem is locked while a client uses it (an open file description lock on
        the file: shared for read-only clients, exclusive for writers, the same locks
        nbdkit takes): a second client that would conflict is refused with "filesystem is
        locked by another client", or with wait=true waits until the first is gone (or
        itself disconnects).

        Making the filesystem, and command=, work as in the tmpdisk plugin ($disk is
        EXPORTSDIR/NAME; part of it comes from the client, so quote it), as do type= and
        label=. Flush is fdatasync(2); FUA writes and trims are flushed; trim punches holes.

        Clients can use any amount of disk space by making exports: serve trusted clients
        only (the ip filter, TLS, a firewall).

        This is nbdkit-ondemand-plugin(1) for pynbd, with the same parameters and messages.
        Two clients asking for the same new export at once make it once (nbdkit may run
        mkfs for both).

    PARAMETERS
        dir=EXPORTSDIR
            The directory holding the filesystems (required).

        [size=]SIZE
            The size of new filesystems (required; only a request with command=). "size="
            may be omitted.

        type=FS
            The filesystem type (default ext4).

        label=LABEL
            The filesystem label (default: none).

        command='COMMAND'
            Make new disks with this shell script instead of mkfs.

        wait=true
            Wait for a locked filesystem instead of refusing the client.

        VAR=VALUE
            Any other parameter is the shell variable $VAR of the command.

    EXAMPLES
        Serve 1 GiB ext4 filesystems on demand:

            mkdir /var/tmp/exports
            pynbd serve ondemand dir=/var/tmp/exports 1G

        Then each export name is its own disk:

            qemu-img info nbd:localhost:10809:exportname=export1
    """

    name = "ondemand"
    version = "1.0"
    durable = True
    config_help = (
        "dir=<EXPORTSDIR> (required) Directory containing filesystems.\n"
        "size=<SIZE>      (required) Virtual filesystem size.\n"
        "label=<LABEL>               The filesystem label.\n"
        "type=ext4|...               The filesystem type.\n"
        "command=<COMMAND>           Alternate command instead of mkfs."
    )

    def __init__(self) -> None:
        super().__init__()
        self._dir: str | None = None
        self._dirfd = -1
        self._wait = False
        self._making: dict[str, threading.Lock] = {}
        self._making_lock = threading.Lock()

    # Configuration ---------------------------------------------------------------------
    def config(self, key: str, value: str) -> None:
        if key == "dir":
            self._dir = realpath(value, "ondemand")
        elif key == "wait":
            try:
                self._wait = parse_bool(value)
            except ConfigError as e:
                raise ConfigError(f"ondemand: {e}") from None
        else:
            super().config(key, value)

    def config_complete(self) -> None:
        if self._dir is None or self._size == -1:
            raise ConfigError("ondemand: dir and size parameters are required")

    def get_ready(self) -> None:
        assert self._dir is not None
        try:
            self._dirfd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"ondemand: opendir: {self._dir}: {e.strerror}") from None

    def cleanup(self) -> None:
        if self._dirfd >= 0:
            os.close(self._dirfd)
            self._dirfd = -1

    # Exports ---------------------------------------------------------------------------
    def list_exports(self, readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
        out = [("", "")]
        assert self._dir is not None
        for name in os.listdir(self._dir):
            if "." in name or ":" in name or name == "default":
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                continue  # export names travel as UTF-8
            out.append((name, ""))
        return out

    def default_export(self, readonly: bool, is_tls: bool) -> str:
        return "default"

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> DiskHandle:
        name = export_name or "default"
        if (len(os.fsencode(name)) > NAME_MAX or "." in name or "/" in name
                or ":" in name or "\0" in name):
            raise self.failed(CommandError(errno.EINVAL,
                                           f"invalid exportname \u2018{name}\u2019 rejected"))
        fd = self._open_or_make(name, readonly)
        try:
            if not _lock(fd, readonly):
                if not self._wait:
                    raise self.failed(CommandError(
                        errno.EINVAL, f"{name}: filesystem is locked by another client"))
                self._wait_for_lock(fd, readonly, name)
        except OSError as e:
            os.close(fd)
            raise self.failed(e, f"fcntl: {self._dir}/{name}") from None
        except BaseException:
            os.close(fd)
            raise
        h = DiskHandle.of(fd, f"{self._dir}/{name}")
        log.debug("ondemand: requested_size = %d, size = %d", self._size, h.size)
        return h

    def _open_or_make(self, name: str, readonly: bool) -> int:
        """Open EXPORTSDIR/NAME, making it first if it does not exist (once, however many
        clients ask for it at the same time)."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        path = f"{self._dir}/{name}"
        with self._making_lock:
            making = self._making.setdefault(name, threading.Lock())
        with making:
            try:
                return os.open(name, flags, dir_fd=self._dirfd)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise self.failed(e, f"open: {path}") from None
            try:
                self.make_disk(path)
            except CommandError as e:
                raise self.failed(e) from None
            try:
                return os.open(name, flags, dir_fd=self._dirfd)
            except OSError as e:
                raise self.failed(e, f"open: {path}") from None

    def _wait_for_lock(self, fd: int, readonly: bool, name: str) -> None:
        """wait=true: try the lock again until it is free, or the client or the server
        goes away."""
        delay = 0.005
        conn = connection()
        while True:
            if conn is not None and conn.closing:
                raise CommandError(errno.ESHUTDOWN, f"{name}: gave up waiting for the lock")
            time.sleep(delay)
            if _lock(fd, readonly):
                return
            delay = min(delay * 2, LOCK_POLL_MAX)
