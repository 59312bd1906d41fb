"""The tls-fallback filter: a dummy read-only export for clients without TLS. Its manual page
is :class:`TlsFallbackFilter`'s docstring."""

from __future__ import annotations

from typing import Any

from pynbd.plugin import CacheMode, Filter, FuaMode

__all__ = ["TlsFallbackFilter"]

#: The dummy export's size, whatever the message (nbdkit's: longer messages are cut).
SIZE = 512
DEFAULT_MESSAGE = ("This NBD server requires TLS authentication before it will serve "
                   "useful data.\n")


class _Plain:
    """The handle of a connection without TLS: the plugin below is not opened."""

    __slots__ = ()


_PLAIN = _Plain()


class TlsFallbackFilter(Filter):
    """NAME
        tls-fallback - pynbd tls-fallback filter: a dummy export for clients without TLS

    SYNOPSIS
        pynbd serve --tls=on --filter=tls-fallback PLUGIN [tlsreadme=MESSAGE]
                    [PLUGIN-ARGS...]

    DESCRIPTION
        With --tls=on the server serves clients with and without TLS alike. This filter
        gives the clients that did not negotiate TLS a harmless read-only export of 512
        bytes holding a message (by default "This NBD server requires TLS authentication
        before it will serve useful data."), while clients with TLS see the plugin as it
        is.

        A client without TLS never reaches the plugin: the plugin is not opened for it,
        its export names are not listed (the list holds the default export alone) and any
        export name gives the dummy export. --tls=require has the same effect on security
        but refuses such clients with an error instead; this filter is for clients that
        would rather read an explanation (an older client, a person with nbdcopy) than an
        error.

        With --tls=off every client is without TLS and sees only the message; with
        --tls=require no client ever does.

        This is nbdkit-tls-fallback-filter(1) for pynbd, with nbdkit 1.32's behaviour.

    PARAMETERS
        tlsreadme=MESSAGE
            The contents of the dummy export instead of the default message. It is cut at
            512 bytes; a shorter one is followed by zeroes.

    EXAMPLES
        Serve a disk to TLS clients and a note to everyone else:

            pynbd serve --tls=on --tls-certificates=/etc/pki/nbd \\
                --filter=tls-fallback file disk.img \\
                tlsreadme="Use TLS: nbds://host/ with the site's CA."
    """

    name = "tls-fallback"
    nonblocking = True
    #: The backend may leave the layer below closed when open() does not open it.
    may_skip_next_open = True

    def __init__(self) -> None:
        self.message = DEFAULT_MESSAGE.encode()

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key == "tlsreadme":
            self.message = value.encode("utf-8", "surrogateescape")
        else:
            next_config(key, value)

    def list_exports(self, next_list_exports: Any, readonly: bool,
                     is_tls: bool) -> Any:
        return next_list_exports(readonly, is_tls) if is_tls else [("", "")]

    def default_export(self, next_default_export: Any, readonly: bool,
                       is_tls: bool) -> str | None:
        return next_default_export(readonly, is_tls) if is_tls else ""  # type: ignore[no-any-return]

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        if not is_tls:
            return _PLAIN
        next_open(readonly, export_name)
        return None

    # ---- what the export is: the plugin's with TLS, the dummy's without --------------
    def get_size(self, next: Any, h: Any) -> int:
        return SIZE if h is _PLAIN else next.get_size()  # type: ignore[no-any-return]

    def export_description(self, next: Any, h: Any) -> str | None:
        return None if h is _PLAIN else next.export_description()  # type: ignore[no-any-return]

    def block_size(self, next: Any, h: Any) -> tuple[int, int, int] | None:
        return None if h is _PLAIN else next.block_size()  # type: ignore[no-any-return]

    def can_write(self, next: Any, h: Any) -> bool:
        return h is not _PLAIN and next.can_write()  # type: ignore[no-any-return]

    def can_flush(self, next: Any, h: Any) -> bool:
        return h is not _PLAIN and next.can_flush()  # type: ignore[no-any-return]

    def is_rotational(self, next: Any, h: Any) -> bool:
        return h is not _PLAIN and next.is_rotational()  # type: ignore[no-any-return]

    def can_trim(self, next: Any, h: Any) -> bool:
        return h is not _PLAIN and next.can_trim()  # type: ignore[no-any-return]

    def can_zero(self, next: Any, h: Any) -> Any:
        return False if h is _PLAIN else next.zero_mode()

    def can_fast_zero(self, next: Any, h: Any) -> bool:
        return h is not _PLAIN and next.can_fast_zero()  # type: ignore[no-any-return]

    def can_extents(self, next: Any, h: Any) -> bool:
        return h is not _PLAIN and next.can_extents()  # type: ignore[no-any-return]

    def can_fua(self, next: Any, h: Any) -> FuaMode:
        return FuaMode.NONE if h is _PLAIN else next.can_fua()  # type: ignore[no-any-return]

    def can_multi_conn(self, next: Any, h: Any) -> bool:
        return h is not _PLAIN and next.can_multi_conn()  # type: ignore[no-any-return]

    def can_cache(self, next: Any, h: Any) -> CacheMode:
        return CacheMode.NONE if h is _PLAIN else next.can_cache()  # type: ignore[no-any-return]

    # ---- data: the message without TLS (the export is read-only then) ----------------
    def pread(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        if h is not _PLAIN:
            return next.pread(count, offset, flags)
        data = self.message[offset:offset + count]
        return data + bytes(count - len(data))

    def pwrite(self, next: Any, h: Any, buf: Any, offset: int, flags: int) -> None:
        next.pwrite(buf, offset, flags)

    def flush(self, next: Any, h: Any, flags: int) -> None:
        next.flush(flags)

    def trim(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        next.trim(count, offset, flags)

    def zero(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        next.zero(count, offset, flags)

    def extents(self, next: Any, h: Any, count: int, offset: int, flags: int) -> Any:
        return next.extents(count, offset, flags)

    def cache(self, next: Any, h: Any, count: int, offset: int, flags: int) -> None:
        next.cache(count, offset, flags)
