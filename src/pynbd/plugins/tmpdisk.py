"""The tmpdisk plugin: a fresh, empty filesystem for each client. Its manual page is
:class:`TmpdiskPlugin`'s docstring."""

from __future__ import annotations

import os
import shutil
import tempfile

from pynbd.errors import CommandError, ConfigError
from pynbd.plugins._filesystems_common import large_tmpdir, log
from pynbd.plugins._filesystems_mkfs import DiskHandle, MkfsPlugin

__all__ = ["TmpdiskPlugin"]


class TmpdiskPlugin(MkfsPlugin):
    """NAME
        tmpdisk - pynbd plugin giving each client a fresh temporary filesystem

    SYNOPSIS
        pynbd serve tmpdisk [size=]SIZE [type=ext4|xfs|vfat|...] [label=LABEL]

        pynbd serve tmpdisk [size=]SIZE command=COMMAND [VAR=VALUE ...]

    DESCRIPTION
        tmpdisk makes a new disk for each client that connects: a sparse file of SIZE
        bytes in a private directory made in $TMPDIR (/var/tmp when TMPDIR is not set),
        formatted by mkfs(8). The client has it to itself, to read and write; nobody else
        sees it. The file is deleted from the directory as soon as it is open (the server
        keeps it open while the client is connected), so it is gone when the client
        disconnects, and nothing is left behind if the server is killed. A remote tmpfs for
        thin clients; for disks that persist, see the ondemand plugin.

        By default the filesystem is ext4, made by

            mkfs -t TYPE EXTRA [-L LABEL] DISK

        with -F for ext2/3/4, -I for vfat, fat and msdos, -Q -F for ntfs and -f for xfs; the
        label option is -n for vfat, fat, msdos and ntfs. Any type mkfs knows can be used.

        With command=, COMMAND (a /bin/sh script) makes the disk instead. It gets the shell
        variables $disk (the absolute path of the file to create; it does not exist yet:
        create it, for example with truncate -s $size "$disk") and $size (SIZE in bytes),
        and one variable for each other KEY=VALUE parameter. The disk served is whatever
        the command made at $disk, a regular file or a block device, of whatever size:
        SIZE is only a request then. Its standard input and output are /dev/null; its
        errors go to the server's log.

        If the command fails, the client's connection is refused and the server logs
        "command exited with code N". Flush requests and FUA are accepted and ignored:
        the disks are temporary. Trim punches holes in the file.

        Each client may use as much space as SIZE: limit how many may connect (the limit
        filter) or who (the ip filter, TLS).

        This is nbdkit-tmpdisk-plugin(1) for pynbd, with the same parameters and messages.
        One difference: nbdkit 1.32 gives mkfs.vfat -L for a label, which it refuses;
        pynbd gives it -n.

    PARAMETERS
        [size=]SIZE
            The size of the disk (required). "size=" may be omitted.

        type=FS
            The filesystem type (default ext4).

        label=LABEL
            The filesystem label (default: none).

        command='COMMAND'
            Make the disk with this shell script instead of mkfs.

        VAR=VALUE
            Any other parameter is the shell variable $VAR of the command.

    ENVIRONMENT
        TMPDIR
            Where the disks are made (default /var/tmp).

    EXAMPLES
        A 16 GiB scratch filesystem for each client:

            pynbd serve tmpdisk 16G

        A blank disk for each client:

            pynbd serve tmpdisk 16G command='truncate -s $size "$disk"'

        A throwaway copy of a base image for each client:

            pynbd serve tmpdisk size=0 base=$PWD/base.img \\
                command='cp --sparse=always "$base" "$disk"'
    """

    name = "tmpdisk"
    version = "1.0"
    config_help = (
        "size=<SIZE>      (required) Virtual filesystem size.\n"
        "label=<LABEL>               The filesystem label.\n"
        "type=ext4|...               The filesystem type.\n"
        "command=<COMMAND>           Alternate command instead of mkfs."
    )

    def __init__(self) -> None:
        super().__init__()
        self._tmpdir = large_tmpdir()

    def config_complete(self) -> None:
        if self._size == -1:
            raise ConfigError("tmpdisk: size parameter is required")

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> DiskHandle:
        # A private directory, so that no other user can get at the file between the
        # command making it and the server opening it.
        try:
            directory = tempfile.mkdtemp(prefix="tmpdisk", dir=self._tmpdir)
        except OSError as e:
            raise self.failed(e, f"{self._tmpdir}/tmpdiskXXXXXX") from None
        disk = os.path.join(directory, "disk")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            try:
                self.make_disk(disk)
                fd = os.open(disk, flags)
            except CommandError as e:
                raise self.failed(e) from None
            except OSError as e:
                raise self.failed(e, f"open: {disk}") from None
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        h = DiskHandle.of(fd, disk)
        log.debug("tmpdisk: requested_size = %d, size = %d", self._size, h.size)
        return h
