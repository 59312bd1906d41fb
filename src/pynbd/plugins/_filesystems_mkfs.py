"""What tmpdisk and ondemand share: their parameters, making a disk (mkfs, or the user's
shell command), and serving it from an open file."""

from __future__ import annotations

import errno
import fnmatch
import os
import shlex
import stat
import subprocess
from typing import Any, ClassVar

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import parse_size
from pynbd.plugin import Flag, FuaMode, Plugin, ThreadModel
from pynbd.plugins._filesystems_common import log, read_fully, run_tool
from pynbd.plugins.file import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

__all__ = ["DiskHandle", "MkfsPlugin", "mkfs_argv"]

#: mkfs's extra options and label option per filesystem type (the shell patterns of
#: nbdkit's default command: ext?, *fat|msdos, ntfs, xfs).
_MKFS_OPTIONS: tuple[tuple[str, list[str], str], ...] = (
    ("ext?", ["-F"], "-L"),
    ("*fat", ["-I"], "-n"),
    ("msdos", ["-I"], "-n"),
    ("ntfs", ["-Q", "-F"], "-n"),
    ("xfs", ["-f"], "-L"),
)


def mkfs_argv(fstype: str, label: str, disk: str) -> list[str]:
    """``mkfs -t TYPE EXTRA [LABELOPT LABEL] DISK`` with nbdkit's options for the type."""
    extra: list[str] = []
    labelopt = "-L"
    for pattern, options, lopt in _MKFS_OPTIONS:
        if fnmatch.fnmatchcase(fstype, pattern):
            extra, labelopt = options, lopt
            break
    argv = ["mkfs", "-t", fstype, *extra]
    if label:
        argv += [labelopt, label]
    return [*argv, disk]


class DiskHandle:
    """One served disk file."""

    __slots__ = ("can_punch_hole", "fd", "name", "size")

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.can_punch_hole = True
        st = os.fstat(fd)
        # The command may have made $disk a block device (or a link to one).
        self.size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size

    @classmethod
    def of(cls, fd: int, name: str) -> DiskHandle:
        """The handle of an open disk (closed if its size cannot be had)."""
        try:
            return cls(fd, name)
        except OSError as e:
            os.close(fd)
            raise CommandError(e.errno or errno.EIO, f"fstat: {name}: {e.strerror}") from None


class MkfsPlugin(Plugin):
    """The parameters and data path of tmpdisk and ondemand: ``[size=]SIZE`` (required),
    ``command=``, and any other ``KEY=VALUE`` as a shell variable for the command (``type``
    and ``label`` for the default one)."""

    thread_model = ThreadModel.PARALLEL
    magic_config_key = "size"
    #: Whether flush and FUA reach the disk (ondemand) or are ignored (tmpdisk).
    durable: ClassVar[bool] = False

    def __init__(self) -> None:
        self._command: str | None = None
        self._size = -1
        self._vars: list[tuple[str, str]] = []

    def config(self, key: str, value: str) -> None:
        if key == "command":
            self._command = value
        elif key == "size":
            try:
                self._size = parse_size(value)
            except ConfigError as e:
                raise ConfigError(f"{self.name}: {e}") from None
        elif key == "disk":
            raise ConfigError(f"{self.name}: 'disk' parameter cannot be set on the command "
                              "line")
        else:
            self._vars.append((key, value))

    # Making a disk -----------------------------------------------------------------------
    def make_disk(self, disk: str) -> None:
        """Run the command (or mkfs) that creates ``disk``; CommandError with nbdkit's
        message if it fails."""
        if self._command is not None:
            lines = [f"disk={shlex.quote(disk)}", f"size={self._size}", ""]
            lines += [f"{shlex.quote(k)}={shlex.quote(v)}" for k, v in self._vars]
            script = "\n".join([*lines, "", self._command])
            log.debug("%s: running command for %s", self.name, disk)
            run_tool([script], self.name, shell=True, style="command")
            return
        variables = dict(self._vars)
        try:
            with open(disk, "wb") as f:
                f.truncate(self._size)
        except OSError as e:
            raise CommandError(e.errno or errno.EIO, f"{disk}: {e.strerror}") from None
        argv = mkfs_argv(variables.get("type") or "ext4", variables.get("label", ""), disk)
        log.debug("%s: %s", self.name, " ".join(argv))
        run_tool(argv, self.name, stdout=subprocess.DEVNULL, style="command")

    def failed(self, e: CommandError | OSError, what: str = "") -> CommandError:
        """Log an open failure as nbdkit does and return the error for the client."""
        if isinstance(e, CommandError):
            msg, err = e.message, e.errno
        else:
            msg = f"{what}: {e.strerror}" if what else str(e.strerror)
            err = e.errno or errno.EIO
        log.error("%s: %s", self.name, msg)
        return CommandError(err, msg)

    # Serving -----------------------------------------------------------------------------
    def close(self, h: DiskHandle) -> None:
        os.close(h.fd)

    def get_size(self, h: DiskHandle) -> int:
        return h.size

    def can_multi_conn(self, h: Any) -> bool:
        return False  # each connection has a disk of its own, or holds its lock

    def can_trim(self, h: Any) -> bool:
        return True

    def can_fua(self, h: Any) -> FuaMode:
        return FuaMode.NATIVE

    def pread_into(self, h: DiskHandle, buf: memoryview, offset: int, flags: int) -> None:
        read_fully(h.fd, buf, offset, self.name)

    def pwrite(self, h: DiskHandle, buf: Any, offset: int, flags: int) -> None:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(h.fd, view[done:], offset + done)
        if flags & Flag.FUA:
            self.flush(h, 0)

    def flush(self, h: DiskHandle, flags: int) -> None:
        if self.durable:
            os.fdatasync(h.fd)

    def trim(self, h: DiskHandle, count: int, offset: int, flags: int) -> None:
        if h.can_punch_hole:
            try:
                fallocate(h.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count)
            except OSError as e:
                # Trim is advisory: only EIO and EPERM are worth a failure.
                if e.errno in (errno.EIO, errno.EPERM):
                    raise
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    h.can_punch_hole = False
                log.debug("%s: ignoring failed fallocate during trim: %s", self.name,
                          e.strerror)
        if flags & Flag.FUA:
            self.flush(h, 0)
