"""The linuxdisk plugin: a directory served as an ext2/3/4 filesystem in a GPT-partitioned
disk. Its manual page is :class:`LinuxdiskPlugin`'s docstring."""

from __future__ import annotations

import os
import stat
import tempfile
import uuid
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import parse_size
from pynbd.plugin import CacheMode, Plugin, ThreadModel
from pynbd.plugins._filesystems_common import (
    FILE,
    SECTOR_SIZE,
    Regions,
    gpt_disk,
    large_tmpdir,
    log,
    read_fully,
    run_tool,
)

__all__ = ["LinuxdiskPlugin", "estimate_size"]

#: The smallest filesystem made when the size is estimated.
MIN_ESTIMATE = 1 << 20
#: Added to the estimate for ext3 and ext4, for the journal.
JOURNAL_ESTIMATE = 32 << 20


def _disk_usage(directory: str) -> int:
    """What ``du -c -k -s DIRECTORY`` counts, in bytes: the blocks allocated to the directory
    and everything below it (symbolic links not followed, a hard-linked file once), in
    whole KiB."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [directory]
    while stack:
        path = stack.pop()
        st = os.lstat(path)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
        total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as it:
                stack.extend(e.path for e in it)
    return -(-total // 1024) * 1024


def estimate_size(directory: str, fstype: str) -> int:
    """nbdkit's estimate of the filesystem needed for ``directory``: its disk usage plus
    20%, at least 1 MiB, plus 32 MiB for a journal (ext3, ext4)."""
    estimate = max(_disk_usage(directory) * 6 // 5, MIN_ESTIMATE)
    if fstype.startswith("ext") and fstype[3:4] > "2":
        estimate += JOURNAL_ESTIMATE
    return estimate


class LinuxdiskPlugin(Plugin):
    """NAME
        linuxdisk - pynbd plugin making a Linux (ext2/3/4) disk from a directory

    SYNOPSIS
        pynbd serve linuxdisk [dir=]DIRECTORY [label=LABEL] [type=ext2|ext3|ext4]
                              [size=[+]SIZE]

    DESCRIPTION
        linuxdisk makes an ext2, ext3 or ext4 filesystem holding the files of DIRECTORY
        (and its subdirectories) and serves it, read-only, as a disk partitioned with GPT
        with the filesystem in its one partition. Hard links, symbolic links, special files
        and the files' owners are kept (mke2fs -d copies them). The disk can be a Linux root
        filesystem.

        The filesystem is made once, when the server starts, by running

            mke2fs -q -F -t TYPE [-L LABEL] -d DIRECTORY FILE

        on a sparse temporary file in $TMPDIR (/var/tmp when TMPDIR is not set). The file
        is deleted from the directory at once (the server keeps it open), so nothing is left
        behind however the server ends. Changes to DIRECTORY after that are not seen.

        The layout is nbdkit's: a protective MBR, the GPT header and partition table, the
        filesystem from 1 MiB, and the backup partition table and header. The partition is
        typed "Linux filesystem data" (0FC63DAF-8483-4772-8E79-3D69D8477DE4) with a random
        unique GUID, and marked legacy-BIOS-bootable.

        Every client sees the same disk: multi-conn is advertised. Put nbdkit's (or pynbd's)
        cow filter on top to let clients write (their writes are then thrown away), or the
        partition filter to serve the bare filesystem.

        This is nbdkit-linuxdisk-plugin(1) for pynbd, with the same parameters, sizes and
        messages. One difference: nbdkit 1.32 writes the first 16 bytes of the text
        "0FC63DAF-8483-47" as the partition type, which partitioning tools show as an unknown
        type; pynbd writes the GUID itself.

    PARAMETERS
        [dir=]DIRECTORY
            The directory whose files are put on the disk (required, once). "dir=" may be
            omitted.

        label=LABEL
            The filesystem's label.

        type=ext2
        type=ext3
        type=ext4
            The filesystem type (any type mke2fs knows whose name starts with "ext"). The
            default is ext2.

        size=SIZE
        size=+SIZE
            The size of the filesystem. Without it, the filesystem is just large enough for
            the files: their disk usage (as du(1) counts it) plus 20%, at least 1 MiB, plus
            32 MiB of journal for ext3 and ext4. "size=SIZE" makes it exactly SIZE (rounded
            up to a whole number of 512-byte sectors; the server does not start if the files
            do not fit). "size=+SIZE" adds SIZE to the estimate: at least SIZE bytes are free.

    ENVIRONMENT
        TMPDIR
            Where the filesystem image is made (default /var/tmp).

    EXAMPLES
        Serve a directory as a disk:

            pynbd serve linuxdisk /path/to/directory label=ROOTFS

        The same with 1 GiB free, and writable (writes are discarded):

            pynbd serve --filter=cow linuxdisk /path/to/directory size=+1G

        Turn a directory into a disk image file:

            pynbd serve -U - linuxdisk /path/to/directory --run 'nbdcopy "$uri" disk.img'
    """

    name = "linuxdisk"
    version = "1.0"
    magic_config_key = "dir"
    thread_model = ThreadModel.PARALLEL
    config_help = (
        "dir=<DIRECTORY>  (required) The directory to serve.\n"
        "label=<LABEL>               The filesystem label.\n"
        "type=ext2|ext3|ext4         The filesystem type.\n"
        "size=[+]<SIZE>              The virtual filesystem size."
    )

    def __init__(self) -> None:
        self._dir: str | None = None
        self._label: str | None = None
        self._type = "ext2"
        self._size = 0
        self._size_add = False
        self._fd = -1
        self._regions = Regions()

    # Configuration ---------------------------------------------------------------------
    def config(self, key: str, value: str) -> None:
        if key == "dir":
            if self._dir is not None:
                raise ConfigError("linuxdisk: dir=<DIRECTORY> must only be set once")
            self._dir = value
        elif key == "label":
            self._label = value
        elif key == "type":
            if not value.startswith("ext"):
                raise ConfigError("linuxdisk: type=<TYPE> must be an filesystem type "
                                  "supported by e2fsprogs")
            self._type = value
        elif key == "size":
            self._size_add = value.startswith("+")
            try:
                self._size = parse_size(value[1:] if self._size_add else value)
            except ConfigError as e:
                raise ConfigError(f"linuxdisk: {e}") from None
        else:
            raise ConfigError(f"linuxdisk: unknown parameter '{key}'")

    def config_complete(self) -> None:
        if self._dir is None:
            raise ConfigError("linuxdisk: you must supply the dir=<DIRECTORY> parameter "
                              "after the plugin name on the command line")

    def get_ready(self) -> None:
        assert self._dir is not None
        directory = self._dir
        if not os.path.isdir(directory):
            why = "Not a directory" if os.path.exists(directory) else "No such file or directory"
            raise ConfigError(f"linuxdisk: {directory}: {why}")
        size = self._size
        if size == 0 or self._size_add:
            try:
                estimate = estimate_size(directory, self._type)
            except OSError as e:
                raise ConfigError(f"linuxdisk: {e.filename}: {e.strerror}") from None
            log.debug("linuxdisk: filesystem size estimate: %d", estimate)
            size = size + estimate if self._size_add else estimate
        size = -(-size // SECTOR_SIZE) * SECTOR_SIZE
        self._fd = self._make_filesystem(directory, size)
        self._regions = gpt_disk(size, uuid.uuid4(), self._add_filesystem)

    def _make_filesystem(self, directory: str, size: int) -> int:
        """mke2fs on a sparse temporary file, unlinked at once: its open descriptor."""
        try:
            fd, path = tempfile.mkstemp(prefix="linuxdisk", dir=large_tmpdir())
        except OSError as e:
            raise ConfigError(f"linuxdisk: mkstemp: {large_tmpdir()}: {e.strerror}") from None
        try:
            os.ftruncate(fd, size)
            argv = ["mke2fs", "-q", "-F", "-t", self._type]
            if self._label is not None:
                argv += ["-L", self._label]
            log.debug("linuxdisk: %s", " ".join([*argv, "-d", directory, path]))
            run_tool([*argv, "-d", directory, path], "mke2fs")
        except (CommandError, OSError) as e:
            os.close(fd)
            msg = e.message if isinstance(e, CommandError) else f"ftruncate: {path}: {e.strerror}"
            raise ConfigError(f"linuxdisk: {msg}") from None
        finally:
            os.unlink(path)
        return fd

    @staticmethod
    def _add_filesystem(regions: Regions, size: int) -> None:
        regions.add(size, FILE)

    def cleanup(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # Connection ------------------------------------------------------------------------
    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        return None

    def get_size(self, h: Any) -> int:
        return self._regions.size

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.EMULATE

    def pread_into(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        self._regions.read_into(buf, offset, self._read_filesystem)

    def _read_filesystem(self, payload: Any, view: memoryview, offset: int) -> None:
        read_fully(self._fd, view, offset, "linuxdisk")
