"""The noextents filter: report the whole disk as allocated data. Its manual page is
:class:`NoextentsFilter`'s docstring."""

from __future__ import annotations

from typing import Any

from pynbd.plugin import Filter

__all__ = ["NoextentsFilter"]


class NoextentsFilter(Filter):
    """NAME
        noextents - pynbd noextents filter: hide the plugin's holes from clients

    SYNOPSIS
        pynbd serve --filter=noextents PLUGIN [PLUGIN-ARGS...]

    DESCRIPTION
        Extents tell NBD clients which parts of a disk are allocated and which are holes or
        read as zeroes, so they can skip the sparse parts. noextents turns this off: the
        plugin is never asked, and every extent query (from clients that negotiated
        structured replies, the only ones who can ask) is answered with allocated data.

        One use is a file plugin serving from a file system where finding holes is slow
        (tmpfs is one). Another is testing how a client copes without sparseness information.
        pynbd serve --no-sr has a similar effect, among others: without structured replies a
        client cannot ask for extents at all.

        This is nbdkit-noextents-filter(1) for pynbd.

    PARAMETERS
        noextents has no parameters: all are the plugin's.

    EXAMPLES
        Serve a file from tmpfs without seeking for holes:

            pynbd serve --filter=noextents file /dev/shm/disk.img
    """

    name = "noextents"
    version = "1.32.5"
    nonblocking = True

    def can_extents(self, next: Any, h: Any) -> bool:
        return False
