"""The handle's settings (``set_*``/``get_*``), what it knows of the export and the
connection (``get_size``, ``can_*``, ``get_uri``...) and the library's identity."""

from __future__ import annotations

import errno as _errno
import os
import socket
from collections.abc import Callable
from typing import Any

from pynbd.client.strict import MAX_REQUEST_SIZE
from pynbd.libnbd.callbacks import index
from pynbd.libnbd.calls import Handle, api
from pynbd.libnbd.constants import (
    ALLOW_TRANSPORT_MASK,
    HANDSHAKE_FLAG_MASK,
    LIBNBD_VERSION,
    SIZE_PAYLOAD,
    STRICT_ACCEPTED,
    TLS_DISABLE,
    TLS_REQUIRE,
    U64,
)
from pynbd.libnbd.states import CONNECTING, ST_CREATED, ST_CREATED_NEG, ST_INFO, ST_URI
from pynbd.protocol.constants import TxFlag

__all__ = ["Settings"]

# Plain ints for what every command checks (enum operators are Python functions).
_TX_DF, _TX_FAST_ZERO = int(TxFlag.SEND_DF), int(TxFlag.SEND_FAST_ZERO)
_TX_WRITE_ZEROES = int(TxFlag.SEND_WRITE_ZEROES)


class Settings(Handle):
    """The settings and export-information calls of :class:`pynbd.libnbd.NBD`."""

    _private: int

    @api()
    def set_debug(self, debug: bool) -> None:
        """Set or clear the debug flag."""
        self._debug_on = bool(debug)

    @api()
    def get_debug(self) -> bool:
        """Return the state of the debug flag."""
        return self._debug_on

    @api()
    def set_debug_callback(self, debug: Callable[[str, str], Any]) -> None:
        """Send debug messages to ``debug(context, msg)`` instead of stderr."""
        if not callable(debug):
            raise TypeError("callback parameter debug is not callable")
        self._debug_cb = debug

    @api()
    def clear_debug_callback(self) -> None:
        """Remove the debug callback; messages go to stderr again."""
        self._debug_cb = None

    @api()
    def set_handle_name(self, handle_name: str) -> None:
        """Set the handle name used in debug output."""
        self._name = str(handle_name)

    @api()
    def get_handle_name(self) -> str:
        """Get the handle name (``nbd1``, ``nbd2``... unless set)."""
        return self._name

    @api()
    def set_private_data(self, private_data: int) -> int:
        """Store an unsigned integer for the application; return the previous value."""
        old = self._private
        self._private = index(private_data) & U64
        return old

    @api()
    def get_private_data(self) -> int:
        """Return the private data (0 if never set)."""
        return self._private

    @api(ST_CREATED_NEG)
    def set_export_name(self, export_name: str) -> None:
        """Set the export name requested by GO/INFO/EXPORT_NAME."""
        self._export_name = str(export_name)

    @api()
    def get_export_name(self) -> str:
        """Return the requested export name (not the canonical one)."""
        return self._export_name

    @api(ST_CREATED_NEG)
    def set_request_block_size(self, request: bool) -> None:
        """Whether GO/INFO request NBD_INFO_BLOCK_SIZE."""
        self._request_bs = bool(request)

    @api()
    def get_request_block_size(self) -> bool:
        return self._request_bs

    @api(ST_CREATED_NEG)
    def set_full_info(self, request: bool) -> None:
        """Also request NBD_INFO_NAME and NBD_INFO_DESCRIPTION."""
        self._full_info = bool(request)

    @api()
    def get_full_info(self) -> bool:
        return self._full_info

    @api(ST_INFO)
    def get_canonical_export_name(self) -> str:
        """NBD_INFO_NAME from the server; ENOTSUP if none was sent."""
        self._need_info("export flags")
        name = self._info.canonical_name
        if name is None:
            raise self._err("server did not advertise a canonical name", _errno.ENOTSUP)
        return str(name)

    @api(ST_INFO)
    def get_export_description(self) -> str:
        """NBD_INFO_DESCRIPTION from the server; ENOTSUP if none was sent."""
        self._need_info("export flags")
        desc = self._info.description
        if desc is None:
            raise self._err("server did not advertise a description", _errno.ENOTSUP)
        return str(desc)

    @api(ST_CREATED)
    def set_tls(self, tls: int) -> None:
        """TLS_DISABLE, TLS_ALLOW (TLS if the server agrees, else plain text) or
        TLS_REQUIRE."""
        self._tls = self._check_enum(tls, TLS_REQUIRE, "tls")

    @api()
    def get_tls(self) -> int:
        return self._tls

    @api(ST_INFO)
    def get_tls_negotiated(self) -> bool:
        """Whether the connection uses TLS."""
        eng = self._eng or self._connecting
        return bool(eng is not None and eng.tls_negotiated)

    @api(ST_CREATED)
    def set_tls_certificates(self, dir: str) -> None:
        self._tls_certs = os.fsdecode(dir)

    @api(ST_CREATED)
    def set_tls_verify_peer(self, verify: bool) -> None:
        self._tls_verify = bool(verify)

    @api()
    def get_tls_verify_peer(self) -> bool:
        return self._tls_verify

    @api(ST_CREATED)
    def set_tls_username(self, username: str) -> None:
        self._tls_username = str(username)

    @api()
    def get_tls_username(self) -> str:
        """The TLS username (default: the login name; ENXIO if the process has none)."""
        if self._tls_username is not None:
            return self._tls_username
        try:
            return os.getlogin()
        except OSError as e:
            raise self._err("getlogin_r", e.errno or _errno.ENXIO) from None

    @api(ST_CREATED)
    def set_tls_psk_file(self, filename: str) -> None:
        self._tls_psk = os.fsdecode(filename)

    @api(ST_CREATED)
    def set_tls_hostname(self, hostname: str) -> None:
        """The name the server's certificate must carry (libnbd 1.22; default: the TCP
        host name connected to)."""
        self._tls_hostname = str(hostname)

    @api()
    def get_tls_hostname(self) -> str:
        """The name set by :meth:`set_tls_hostname`; the empty string if none."""
        return self._tls_hostname or ""

    @api(ST_CREATED)
    def set_request_structured_replies(self, request: bool) -> None:
        """Whether connecting sends NBD_OPT_STRUCTURED_REPLY."""
        self._request_sr = bool(request)

    @api()
    def get_request_structured_replies(self) -> bool:
        return self._request_sr

    @api(ST_INFO)
    def get_structured_replies_negotiated(self) -> bool:
        """Whether structured replies are in use."""
        return bool(self._eng is not None and self._eng.structured)

    @api(ST_CREATED)
    def set_handshake_flags(self, flags: int) -> None:
        """Handshake flags the client may use (HANDSHAKE_FLAG_*)."""
        self._hflags = self._check_flags("", flags, HANDSHAKE_FLAG_MASK)

    @api()
    def get_handshake_flags(self) -> int:
        """Before connecting the flags the client will use; afterwards the negotiated ones."""
        eng = self._eng
        if eng is not None and self._state != CONNECTING:
            hs = eng.hs
            if eng.protocol == "oldstyle":
                return 0
            return int(getattr(hs, "server_flags", self._hflags)) & self._hflags
        return self._hflags

    @api()
    def set_pread_initialize(self, request: bool) -> None:
        """Whether read buffers are zeroed before a read."""
        self._pread_init = bool(request)

    @api()
    def get_pread_initialize(self) -> bool:
        return self._pread_init

    @api()
    def set_strict_mode(self, flags: int) -> None:
        """Which client-side checks run before a command is sent (STRICT_*)."""
        self._strict = self._check_flags("", flags, STRICT_ACCEPTED)

    @api()
    def get_strict_mode(self) -> int:
        return self._strict

    @api(ST_CREATED)
    def set_opt_mode(self, enable: bool) -> None:
        """Stop in the Negotiating state after the handshake so opt_* calls can be used."""
        self._opt_mode = bool(enable)

    @api()
    def get_opt_mode(self) -> bool:
        return self._opt_mode

    @api(ST_CREATED_NEG)
    def add_meta_context(self, name: str) -> None:
        """Append a meta context to request (e.g. CONTEXT_BASE_ALLOCATION)."""
        self._meta.append(str(name))

    @api()
    def get_nr_meta_contexts(self) -> int:
        return len(self._meta)

    @api()
    def get_meta_context(self, i: int) -> str:
        i = index(i) & U64
        if i >= len(self._meta):
            raise self._err("meta context request out of range", _errno.EINVAL)
        return self._meta[i]

    @api(ST_CREATED_NEG)
    def clear_meta_contexts(self) -> None:
        self._meta.clear()

    @api(ST_CREATED)
    def set_uri_allow_transports(self, mask: int) -> None:
        self._allow_transports = self._check_flags("", mask, ALLOW_TRANSPORT_MASK, "mask")

    @api(ST_CREATED)
    def set_uri_allow_tls(self, tls: int) -> None:
        self._allow_tls = self._check_enum(tls, TLS_REQUIRE, "tls")

    @api(ST_CREATED)
    def set_uri_allow_local_file(self, allow: bool) -> None:
        self._allow_local_file = bool(allow)

    def _need_info(self, what: str = "export flags") -> None:
        if self._info is None:
            raise self._err(f"server has not returned {what}, you need to connect to the "
                            "server first", _errno.EINVAL)

    def _eflags(self) -> int:
        self._need_info("export flags")
        fl = int(self._info.eflags)
        eng = self._eng
        if fl & _TX_DF and not (eng is not None and eng.structured):
            fl &= ~_TX_DF
        if fl & _TX_FAST_ZERO and not fl & _TX_WRITE_ZEROES:
            fl &= ~_TX_FAST_ZERO
        return fl

    @api(ST_INFO)
    def get_size(self) -> int:
        """The export size in bytes."""
        self._need_info("export size")
        return int(self._info.size)

    @api(ST_INFO)
    def get_block_size(self, size_type: int) -> int:
        """SIZE_MINIMUM / PREFERRED / MAXIMUM as advertised (0 if not); SIZE_PAYLOAD: the
        largest payload this client sends."""
        t = self._check_enum(size_type, SIZE_PAYLOAD, "size_type")
        self._need_info("export flags")
        bs = self._info.block_size
        if t == SIZE_PAYLOAD:
            return min(bs[2], MAX_REQUEST_SIZE) if bs else MAX_REQUEST_SIZE
        return int(bs[t]) if bs else 0

    @api(ST_INFO)
    def get_protocol(self) -> str:
        """``"oldstyle"``, ``"newstyle"`` or ``"newstyle-fixed"``."""
        assert self._eng is not None
        return str(self._eng.protocol)

    def _flag(self, bit: int) -> bool:
        return bool(self._eflags() & bit)

    @api(ST_INFO)
    def is_read_only(self) -> bool:
        return self._flag(TxFlag.READ_ONLY)

    @api(ST_INFO)
    def can_flush(self) -> bool:
        return self._flag(TxFlag.SEND_FLUSH)

    @api(ST_INFO)
    def can_fua(self) -> bool:
        return self._flag(TxFlag.SEND_FUA)

    @api(ST_INFO)
    def is_rotational(self) -> bool:
        return self._flag(TxFlag.ROTATIONAL)

    @api(ST_INFO)
    def can_trim(self) -> bool:
        return self._flag(TxFlag.SEND_TRIM)

    @api(ST_INFO)
    def can_zero(self) -> bool:
        return self._flag(TxFlag.SEND_WRITE_ZEROES)

    @api(ST_INFO)
    def can_fast_zero(self) -> bool:
        return self._flag(TxFlag.SEND_FAST_ZERO)

    @api(ST_INFO)
    def can_df(self) -> bool:
        return self._flag(TxFlag.SEND_DF)

    @api(ST_INFO)
    def can_multi_conn(self) -> bool:
        return self._flag(TxFlag.CAN_MULTI_CONN)

    @api(ST_INFO)
    def can_cache(self) -> bool:
        return self._flag(TxFlag.SEND_CACHE)

    @api(ST_INFO)
    def can_meta_context(self, metacontext: str) -> bool:
        """Whether the server agreed to the meta context ``metacontext``."""
        self._need_info("export flags")
        return str(metacontext) in self._contexts

    @api()
    def get_package_name(self) -> str:
        return "libnbd"

    @api()
    def get_version(self) -> str:
        return LIBNBD_VERSION

    @api()
    def supports_tls(self) -> bool:
        return True

    @api()
    def supports_vsock(self) -> bool:
        return hasattr(socket, "AF_VSOCK")

    @api()
    def supports_uri(self) -> bool:
        return True

    @api(ST_URI)
    def get_uri(self) -> str:
        """An NBD URI for this connection (EINVAL for command/socket connections)."""
        from pynbd.protocol.uri import NBDURI, format_uri

        u = self._uri
        if u is None:
            raise self._err("cannot construct a URI for this connection type", _errno.EINVAL)
        kw: dict[str, Any] = {"transport": u["transport"], "export": self._export_name}
        if u["transport"] == "unix":
            kw["socket"] = u["socket"]
        else:
            kw["host"] = u["host"]
            kw["port"] = u["port"]
        if self._tls_username is not None and self._tls != TLS_DISABLE:
            kw["user"] = self._tls_username
        if self._tls != TLS_DISABLE:  # the files with TLS_ALLOW too, as libnbd
            kw.update(tls=self._tls == TLS_REQUIRE, tls_certificates=self._tls_certs,
                      tls_psk_file=self._tls_psk)
        return format_uri(NBDURI(**kw), always_port=True)
