"""HTTP for the curl plugin, through urllib3: one pool manager per server (kept-alive
connections shared by every client and worker thread), Unix-socket connections, proxies,
TLS settings, and the error texts libcurl would give."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.util import SKIP_HEADER

from pynbd.errors import CommandError, ConfigError

__all__ = ["HttpSettings", "make_pool", "socket_options", "split_header", "tls_context"]

#: TLS versions by nbdkit's ssl-version= names (the minimum version allowed).
SSL_VERSIONS: dict[str, ssl.TLSVersion | None] = {
    "default": None,
    "tlsv1": ssl.TLSVersion.TLSv1,
    "sslv2": None,
    "sslv3": None,
    "tlsv1.0": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}


@dataclass
class HttpSettings:
    """What the parameters say about making connections."""

    cainfo: str | None = None
    capath: str | None = None
    sslverify: bool = True
    ssl_version: str | None = None
    ssl_cipher_list: str | None = None
    tcp_keepalive: bool = False
    tcp_nodelay: bool = True
    timeout: int = 0
    unix_socket_path: str | None = None
    proxy: str | None = None
    proxy_user: str | None = None
    proxy_password: str | None = None
    maxsize: int = 16
    extra: dict[str, Any] = field(default_factory=dict)


class _UnixConnection(HTTPConnection):
    """An HTTP connection over a Unix socket (curl's --unix-socket): the URL's host still
    goes in the Host header."""

    socket_path = ""

    def _new_conn(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            t = self.timeout
            if isinstance(t, int | float):
                s.settimeout(t)
            s.connect(self.socket_path)
        except OSError as e:
            s.close()
            raise urllib3.exceptions.NewConnectionError(
                self, f"Failed to connect to {self.socket_path}: {e.strerror}") from e
        return s


class _UnixPool(HTTPConnectionPool):
    ConnectionCls = _UnixConnection


class _UnixPoolManager(urllib3.PoolManager):
    """A pool manager whose every connection goes to one Unix socket."""

    def __init__(self, path: str, **kw: Any) -> None:
        super().__init__(**kw)
        conn_cls = type("_UnixConnectionTo", (_UnixConnection,), {"socket_path": path})
        pool_cls = type("_UnixPoolTo", (_UnixPool,), {"ConnectionCls": conn_cls})
        self.pool_classes_by_scheme = {"http": pool_cls, "https": pool_cls}


def socket_options(s: HttpSettings) -> list[tuple[int, int, int]]:
    opts: list[tuple[int, int, int]] = []
    if s.tcp_nodelay and not s.unix_socket_path:
        opts.append((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
    if s.tcp_keepalive:
        opts.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
    return opts


def tls_context(s: HttpSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if not s.sslverify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if s.cainfo == "":
        # cainfo= (empty): no CA bundle at all, not even the default one.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if not s.sslverify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    elif s.cainfo or s.capath:
        try:
            ctx.load_verify_locations(cafile=s.cainfo or None, capath=s.capath or None)
        except (OSError, ssl.SSLError) as e:
            raise CommandError(5, f"Problem with the SSL CA cert (path? access rights?): "
                                  f"error setting certificate verify locations: "
                                  f"CAfile: {s.cainfo or 'none'} CApath: {s.capath or 'none'}"
                                  f" ({getattr(e, 'strerror', None) or e})") from None
    if s.ssl_version:
        version = SSL_VERSIONS.get(s.ssl_version)
        if version is not None:
            ctx.minimum_version = version
    if s.ssl_cipher_list:
        try:
            ctx.set_ciphers(s.ssl_cipher_list)
        except ssl.SSLError:
            raise ConfigError(f"failed setting cipher list: {s.ssl_cipher_list}") from None
    return ctx


def make_pool(s: HttpSettings) -> urllib3.PoolManager:
    """The pool manager for these settings: ``maxsize`` kept-alive connections per host,
    a request waiting for a free one rather than opening more."""
    timeout = urllib3.Timeout(total=s.timeout) if s.timeout > 0 else urllib3.Timeout()
    kw: dict[str, Any] = {
        "num_pools": 4,
        "maxsize": s.maxsize,
        "block": True,
        "timeout": timeout,
        "retries": False,
        "socket_options": socket_options(s),
        "ssl_context": tls_context(s),
    }
    if not s.sslverify:
        kw["assert_hostname"] = False
        kw["cert_reqs"] = "CERT_NONE"
    if s.unix_socket_path:
        return _UnixPoolManager(s.unix_socket_path, **kw)
    if s.proxy:
        proxy = s.proxy if "://" in s.proxy else "http://" + s.proxy
        headers = {}
        if s.proxy_user is not None:
            headers = urllib3.make_headers(
                proxy_basic_auth=f"{s.proxy_user}:{s.proxy_password or ''}")
        return urllib3.ProxyManager(proxy, proxy_headers=headers, **kw)
    return urllib3.PoolManager(**kw)


def split_header(line: str) -> tuple[str, str | None] | None:
    """One ``header=`` line as libcurl reads it: ``Name: value`` adds a header, ``Name:``
    removes one (None), ``Name;`` adds an empty one. None for a line that is neither."""
    line = line.rstrip("\r\n")
    colon = line.find(":")
    semi = line.find(";")
    if colon > 0 and (semi < 0 or colon < semi):
        name, value = line[:colon].strip(), line[colon + 1:].strip()
        return (name, value if value else None)
    if semi > 0 and line[semi + 1:].strip() == "":
        return (line[:semi].strip(), "")
    return None


#: Header value meaning "do not send this default header" (urllib3's sentinel).
SKIP = SKIP_HEADER
