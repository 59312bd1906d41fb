"""The curl plugin's READ path: HTTP/1.1 range GETs on kept-alive connections, the body
received straight into the buffer handed to the client.

urllib3 costs about 0.3 ms of CPU per request in Python (header objects, the email parser
for the response headers, retries, pool bookkeeping), more than receiving 256 KiB does.
A READ only needs ``GET`` with a ``Range`` and a ``206`` with the bytes asked for, so that
is done here on plain sockets: the request is one ``sendall``, the headers one or two
``recv_into``, the body lands in its ``bytearray`` with no copy on the way. Connections
are kept per (scheme, host, port) and shared by every worker thread and client.

Anything else (a status other than 206, a chunked or encoded body, a Content-Range that
is not the one asked for, a connection that cannot be made) is not handled here:
:meth:`RangeReader.get` returns None and the plugin asks again through urllib3, which
gives libcurl's words for what went wrong. Proxies and cookie jars always go through
urllib3.
"""

from __future__ import annotations

import collections
import errno
import functools
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

from pynbd.errors import CommandError
from pynbd.plugins._network_http import SKIP, HttpSettings, socket_options

__all__ = ["RangeReader", "target"]

_HEAD_MAX = 16384  # response headers longer than this go through urllib3


class _Unusable(Exception):
    """A response this path does not handle: ask through urllib3 instead."""


class RangeReader:
    """Range GETs for one plugin, on up to ``keep`` idle connections per server."""

    def __init__(self, s: HttpSettings, tls: ssl.SSLContext | None, keep: int) -> None:
        self.s = s
        self.tls = tls
        self.keep = keep
        self.timeout = s.timeout if s.timeout > 0 else None
        self._idle: dict[tuple[str, str, int], collections.deque[socket.socket]] = {}

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    def get(self, url: str, headers: dict[str, Any], offset: int,
            count: int) -> bytearray | None:
        """``count`` bytes from ``offset``, or None when urllib3 has to ask instead."""
        key, path, host = target(url)
        if not key:
            return None
        req = _request(path, host, headers, offset, count)
        idle = self._idle.setdefault(key, collections.deque())
        for _ in range(2):  # a kept-alive connection the server closed: once more, fresh
            reused = bool(idle)
            try:
                sock = idle.pop() if reused else self._connect(key)
            except (OSError, IndexError):
                return None
            try:
                data, keep = _exchange(sock, req, offset, count)
            except TimeoutError as e:
                sock.close()
                raise CommandError(errno.ETIMEDOUT, f"Timeout was reached: {e}") from None
            except (OSError, _Unusable, ValueError):
                sock.close()
                if reused:
                    continue
                return None
            if keep and len(idle) < self.keep:
                idle.append(sock)
            else:
                sock.close()
            return data
        return None

    def _connect(self, key: tuple[str, str, int]) -> socket.socket:
        scheme, host, port = key
        s = self.s
        if s.unix_socket_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(s.unix_socket_path)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection((host, port), timeout=self.timeout)
            for opt in socket_options(s):
                sock.setsockopt(*opt)
        if scheme == "https":
            assert self.tls is not None
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        return sock


@functools.lru_cache(maxsize=64)
def target(url: str) -> tuple[Any, str, str]:
    """((scheme, host, port), request target, Host header) of a URL; an empty key for one
    this path does not serve."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        return ((), "", "")
    port = u.port or (443 if u.scheme == "https" else 80)
    host = u.hostname
    hosthdr = f"[{host}]" if ":" in host else host
    if u.port:
        hosthdr += f":{u.port}"
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return ((u.scheme, host, port), path, hosthdr)


def _request(target: str, host: str, headers: dict[str, Any], offset: int,
             count: int) -> bytes:
    """The request as urllib3 would send it: Host, the plugin's headers (SKIP and None
    left out), Accept-Encoding identity, the Range."""
    lines = [f"GET {target} HTTP/1.1"]
    names = {k.lower() for k in headers}
    if "host" not in names:
        lines.append(f"Host: {host}")
    for k, v in headers.items():
        if v is not None and v is not SKIP and v != SKIP:
            lines.append(f"{k}: {v}")
    if "accept-encoding" not in names:
        lines.append("Accept-Encoding: identity")
    lines.append(f"Range: bytes={offset}-{offset + count - 1}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _exchange(sock: socket.socket, req: bytes, offset: int,
              count: int) -> tuple[bytearray, bool]:
    """Send the request, receive a 206 for exactly the range: (the bytes, whether the
    connection may be used again)."""
    sock.sendall(req)
    head = bytearray(_HEAD_MAX)
    view = memoryview(head)
    n = 0
    while True:
        got = sock.recv_into(view[n:])
        if got == 0:
            raise ConnectionError("the server closed the connection")
        n += got
        end = head.find(b"\r\n\r\n", max(0, n - got - 3), n)
        if end >= 0:
            break
        if n == _HEAD_MAX:
            raise _Unusable
    keep = _check_head(bytes(head[:end]).decode("latin-1"), offset, count)
    rest = n - end - 4
    if rest > count:
        raise _Unusable
    out = bytearray(count)
    out[:rest] = view[end + 4:n]
    ov = memoryview(out)
    pos = rest
    while pos < count:
        got = sock.recv_into(ov[pos:])
        if got == 0:
            raise _Unusable
        pos += got
    return out, keep


def _check_head(text: str, offset: int, count: int) -> bool:
    """A 206 whose body is the range asked for, unencoded: whether the connection stays."""
    lines = text.split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or status[1] != "206" or not status[0].startswith("HTTP/1."):
        raise _Unusable
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise _Unusable
        fields[name.strip().lower()] = value.strip()
    if "transfer-encoding" in fields or \
            fields.get("content-encoding", "identity").lower() != "identity":
        raise _Unusable
    if fields.get("content-length") != str(count):
        raise _Unusable
    crange = fields.get("content-range", "")
    if not crange.startswith(f"bytes {offset}-{offset + count - 1}/"):
        raise _Unusable
    conn = fields.get("connection", "").lower()
    return status[0] == "HTTP/1.1" and conn != "close" or conn == "keep-alive"
