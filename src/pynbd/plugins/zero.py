"""The zero plugin: a zero-length disk. Its manual page is :class:`ZeroPlugin`'s docstring."""

from __future__ import annotations

from typing import Any

from pynbd.errors import ConfigError
from pynbd.plugin import CacheMode, Plugin, ThreadModel

__all__ = ["ZeroPlugin"]


class ZeroPlugin(Plugin):
    """NAME
        zero - pynbd zero length plugin

    SYNOPSIS
        pynbd serve zero

    DESCRIPTION
        zero is a plugin for pynbd which serves a read-only disk of size zero. It takes no
        parameters. It is useful for testing corner cases in clients (an export with no
        blocks at all); "pynbd serve null" does the same with a writable disk, and
        "pynbd serve null size=N" gives it a size.

        This is nbdkit-zero-plugin(1) for pynbd; the command line is the same.

    PARAMETERS
        None: any parameter is an error.

    EXAMPLES
        Check that a client copes with an empty disk:

            pynbd serve -U - zero --run 'nbdinfo "$uri"'
    """

    name = "zero"
    version = "1.0"
    magic_config_key = None
    thread_model = ThreadModel.PARALLEL
    nonblocking = True
    config_help = ""

    def config(self, key: str, value: str) -> None:
        raise ConfigError("zero: this plugin does not need command line configuration")

    def get_size(self, h: Any) -> int:
        return 0

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    def pread(self, h: Any, count: int, offset: int, flags: int) -> Any:
        # Never called for a zero-length disk (the server checks bounds); be total anyway.
        return bytes(count)

    def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass
