"""Connecting a handle: ``connect_*`` and ``aio_connect_*``, NBD URIs as libnbd 1.14 reads
them (the URI parser's libxml2 behaviour, then lib/uri.c's checks, in its order and words),
and the move to negotiating or ready once connected."""

from __future__ import annotations

import errno as _errno
import functools
import os
import re
import socket
from typing import Any

from pynbd.errors import OptionError
from pynbd.libnbd.callbacks import check_list, index, u32
from pynbd.libnbd.calls import Handle, api
from pynbd.libnbd.constants import (
    ALLOW_TRANSPORT_TCP,
    ALLOW_TRANSPORT_UNIX,
    TLS_DISABLE,
    TLS_REQUIRE,
    TRANSPORT_BIT,
    U32,
    U64,
    URI_SCHEMES,
)
from pynbd.libnbd.driver import connect
from pynbd.libnbd.engine import Engine
from pynbd.libnbd.errors import failure_text, go_failure_text
from pynbd.libnbd.states import CONNECTING, CREATED, DEAD, NEGOTIATING, ST_CREATED
from pynbd.protocol._uriparse import XmlURI, libnbd_queries, parse_libxml2

__all__ = ["Connecting", "scan_u32"]


def scan_u32(text: str) -> int | None:
    """sscanf(text, "%" SCNu32): leading space, a sign, digits; None if no number."""
    m = re.match(r"\s*([+-]?)([0-9]+)", text)
    if m is None:
        return None
    v = min(int(m.group(2)), U64)
    if m.group(1) == "-":
        v = -v & U64
    return v & U32


class Connecting(Handle):
    """The connecting calls of :class:`pynbd.libnbd.NBD`."""

    def _engine(self) -> Engine:
        """A new engine with this handle's settings (libnbd makes its checks itself)."""
        tls = tls_host = None
        if self._tls != TLS_DISABLE:
            from pynbd.client.tls import TLSConfig

            tls = TLSConfig(self._tls, self._tls_certs, self._tls_verify, self._tls_username,
                            self._tls_psk, self._tls_hostname)
            u = self._uri
            tls_host = u["host"] if u is not None and u["transport"] == "tcp" else None
        return Engine(self._stats, {
            "handshake_flags": self._hflags, "full_info": self._full_info,
            "request_block_size": self._request_bs, "request_structured": self._request_sr,
            "_meta_requested": [] if self._opt_mode else list(self._meta),
            "opt_mode": self._opt_mode, "strict": 0, "tls": tls, "tls_host": tls_host})

    def _connect_now(self, where: dict[str, Any], host: str) -> dict[str, Any]:
        """connect(2) in the call, as libnbd: a non-blocking socket whose failure is known at
        once fails the call (TCP: after every address was tried); a connect still in
        progress is finished by the driver."""
        family: int
        if "unix" in where:
            family, addrs = int(socket.AF_UNIX), [where["unix"]]
        elif "vsock" in where:
            family, addrs = int(getattr(socket, "AF_VSOCK", -2)), [where["vsock"]]
        elif "tcp_addrs" in where:
            family, addrs = -1, where["tcp_addrs"]
        else:
            return where
        last = 0
        for i, a in enumerate(addrs):
            try:
                if family == -1:
                    s = socket.socket(a[0], a[1], a[2])
                    addr = a[4]
                else:
                    s = socket.socket(family, socket.SOCK_STREAM)
                    addr = a
            except OSError as e:
                last = e.errno or _errno.EAFNOSUPPORT
                continue
            if family == socket.AF_UNIX and addr == "":
                # libnbd passes the whole (zeroed) sockaddr_un: an abstract name of NULs.
                addr = "\0" * 108
            s.setblocking(False)
            try:
                s.connect(addr)
            except BlockingIOError:
                # libnbd reads SO_ERROR at once: a refusal over loopback is already known.
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err and err != _errno.EINPROGRESS:
                    s.close()
                    last = err
                    continue
                return {"pending": (s, addrs[i + 1:])}
            except OSError as e:
                s.close()
                last = e.errno or _errno.EINVAL
                continue
            return {"pending": (s, [])}
        if host:
            # libnbd goes back to START when every address failed: it can connect again.
            self._state = CREATED
            raise self._err(f"connect: {host}: could not connect to remote host", last)
        self._state = DEAD
        raise self._err("connect", last)

    def _start_connect(self, where: dict[str, Any], host: str = "") -> None:
        """connect(2) in the call; the rest (a started server, the handshake) in the calls
        that follow (poll(), or this one for a blocking connect)."""
        where = self._connect_now(where, host)
        self._state = CONNECTING
        phase = self._phase = ["connect"]
        eng = self._engine()
        self._connecting = eng
        self._pending_opt = "connect"
        self._driver.start(connect(eng, where, self._export_name, phase),
                           functools.partial(self._connected, host, eng))
        self._driver.resume(defer=True)

    def _connected(self, host: str, eng: Engine, result: Any, exc: BaseException | None) -> None:
        self._pending_opt = None
        self._connecting = None
        if exc is not None:
            self._state = DEAD
            eng.hang_up()
            eng.reap()
            if isinstance(exc, OptionError):
                msg, num = go_failure_text(exc.reply, self._export_name)
            elif isinstance(exc, OSError) and exc.errno and self._phase[0] == "connect":
                # connect(2) failed: no NBD byte was exchanged.
                if host:
                    # libnbd tries each address in turn and, when all fail, goes back to
                    # START: the handle can connect again.
                    self._state = CREATED
                    msg = f"connect: {host}: could not connect to remote host"
                else:
                    msg = "connect"
                num = exc.errno
            else:
                msg, num = failure_text(exc, connecting=True)
            raise self._err(msg, num)
        self._eng = eng
        self._driver.eng = eng
        if self._opt_mode and not eng.connected:
            # Option mode stops in negotiation, with a plain newstyle server too.
            self._state = NEGOTIATING
        else:
            self._became_ready()

    def _connect_blocking(self, where: dict[str, Any], host: str = "") -> None:
        self._start_connect(where, host)
        self._run_until(lambda: self._pending_opt is None)

    @api(ST_CREATED)
    def connect_uri(self, uri: str) -> None:
        """Connect to an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://, nbd+vsock://,
        nbds+vsock://)."""
        self._connect_blocking(*self._uri_target(uri))

    @api(ST_CREATED)
    def aio_connect_uri(self, uri: str) -> None:
        self._start_connect(*self._uri_target(uri))

    def _uri_target(self, uri: str) -> tuple[dict[str, Any], str]:
        """lib/uri.c (1.14) over libxml2's parser: the same checks, order and messages. An
        nbds URI sets TLS_REQUIRE; an nbd one leaves the handle's TLS setting as it is."""
        raw = str(uri)
        u = parse_libxml2(raw)
        if u is None:
            raise self._err(f"unable to parse URI: {raw}", _errno.EINVAL)
        transport, unixsocket = self._uri_checks(raw, u)
        if u.user is not None:
            self._tls_username = u.user
        self._export_name = u.path[1:] if u.path else ""
        if transport == "unix":
            assert unixsocket is not None
            self._uri = {"transport": "unix", "socket": unixsocket}
            return {"unix": unixsocket}, ""
        port = u.port if u.port > 0 else 10809
        if transport == "vsock":
            cid = 2
            if u.server:
                c = scan_u32(u.server)
                if c is None:
                    raise self._err(f"cannot parse vsock CID from NBD URI: {u.server}",
                                    _errno.EINVAL)
                cid = c
            self._uri = {"transport": "vsock", "host": str(cid), "port": port}
            return {"vsock": (cid, port)}, ""
        server = u.server or "localhost"
        if len(server) >= 2 and server[0] == "[" and server[-1] == "]":
            server = server[1:-1]
        return self._tcp_target(server, str(port))

    def _uri_checks(self, raw: str, u: XmlURI) -> tuple[str, str | None]:
        """lib/uri.c's checks of a parsed URI, in order: (transport, socket= path)."""
        scheme = u.scheme
        if scheme is None:
            hint = ""
            if raw.startswith("/") and self._allow_transports & ALLOW_TRANSPORT_UNIX:
                hint = ': to open a local socket use "nbd+unix://?socket=PATH"'
            elif raw[:9].lower() == "localhost" and self._allow_transports & ALLOW_TRANSPORT_TCP:
                hint = ': to open a local port use "nbd://localhost" or "nbd://localhost:PORT"'
            raise self._err("NBD URI does not have a scheme: valid NBD URIs should start with "
                            "a scheme like nbd://, nbds:// or nbd+unix://" + hint,
                            _errno.EINVAL)
        spec = URI_SCHEMES.get(scheme)
        if spec is None:
            raise self._err(f"unknown NBD URI scheme: {scheme}", _errno.EINVAL)
        transport, tls = spec
        if not raw.startswith("://", len(scheme)):
            raise self._err(f"URI must begin with '{scheme}://'", _errno.EINVAL)
        if not self._allow_transports & TRANSPORT_BIT[transport]:
            raise self._err(f"URI transport {scheme} is not permitted", _errno.EPERM)
        if (tls and self._allow_tls == TLS_DISABLE) or \
                (not tls and self._allow_tls == TLS_REQUIRE):
            raise self._err(f"URI TLS setting {scheme} is not permitted", _errno.EPERM)
        queries = libnbd_queries(u.query_raw)
        unixsocket = None
        for name, value in queries:
            if name == "socket":
                unixsocket = value
        if transport == "unix" and unixsocket is None:
            raise self._err("cannot parse socket parameter from NBD URI (did you mean to use "
                            f'"{scheme}:///?socket=..."?)', _errno.EINVAL)
        if transport != "unix" and unixsocket is not None:
            plain = "nbds" if tls else "nbd"
            raise self._err(f'socket parameter is incompatible with "{scheme}:" (did you mean '
                            f'to use "{plain}+unix:///?socket=..."?)', _errno.EINVAL)
        if tls:
            self._tls = TLS_REQUIRE
        self._uri_files(queries)
        return transport, unixsocket

    def _uri_files(self, queries: list[tuple[str, str]]) -> None:
        """tls-certificates= and tls-psk-file=, only with set_uri_allow_local_file."""
        for name, value in queries:
            if name in ("tls-certificates", "tls-psk-file"):
                if not self._allow_local_file:
                    raise self._err(f"local file access ({name}) is not allowed, call "
                                    "nbd_set_uri_allow_local_file to enable this",
                                    _errno.EPERM)
                if name == "tls-certificates":
                    self._tls_certs = value
                else:
                    self._tls_psk = value
            elif name == "tls-verify-peer":  # later libnbd's; 1.14 ignores it
                v = value.lower()
                if v in ("0", "false", "no", "off", "1", "true", "yes", "on"):
                    self._tls_verify = v in ("1", "true", "yes", "on")
            elif name == "tls-hostname":  # libnbd 1.22's
                self._tls_hostname = value

    @api(ST_CREATED)
    def connect_unix(self, unixsocket: str) -> None:
        """Connect to a Unix-domain socket."""
        path = os.fsdecode(unixsocket)
        self._uri = {"transport": "unix", "socket": path}
        self._connect_blocking({"unix": path})

    @api(ST_CREATED)
    def aio_connect_unix(self, unixsocket: str) -> None:
        path = os.fsdecode(unixsocket)
        self._uri = {"transport": "unix", "socket": path}
        self._start_connect({"unix": path})

    @api(ST_CREATED)
    def aio_connect(self, addr: str) -> None:
        """Connect to a raw address: in Python only an AF_UNIX path."""
        if not isinstance(addr, str):
            raise TypeError("aio_connect: addr must be a str (an AF_UNIX path)")
        self._uri = {"transport": "unix", "socket": addr}
        self._start_connect({"unix": addr})

    def _tcp_target(self, hostname: str, port: Any) -> tuple[dict[str, Any], str]:
        """getaddrinfo() in the call, as libnbd (its failure leaves the handle in START);
        the addresses are then tried in turn."""
        host = str(hostname)
        p = str(port)
        try:
            addrs = socket.getaddrinfo(host, p, socket.AF_UNSPEC, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise self._err(f'getaddrinfo: hostname "{host}" port "{p}": {e.strerror}',
                            0) from None
        except UnicodeError:
            raise self._err(f'getaddrinfo: hostname "{host}" port "{p}": '
                            "Name or service not known", 0) from None
        num = int(p) if p.isdigit() else (addrs[0][4][1] if addrs else 10809)
        self._uri = {"transport": "tcp", "host": host, "port": num}
        return {"tcp_addrs": addrs}, f"{host}:{p}"

    @api(ST_CREATED)
    def connect_tcp(self, hostname: str, port: str) -> None:
        """Connect over TCP; ``port`` is a string (a number or a service name)."""
        self._connect_blocking(*self._tcp_target(hostname, port))

    @api(ST_CREATED)
    def aio_connect_tcp(self, hostname: str, port: str) -> None:
        self._start_connect(*self._tcp_target(hostname, port))

    @api(ST_CREATED)
    def connect_vsock(self, cid: int, port: int) -> None:
        """Connect over AF_VSOCK."""
        c, p = u32(cid), u32(port)
        self._uri = {"transport": "vsock", "host": str(c), "port": p}
        self._connect_blocking({"vsock": (c, p)})

    @api(ST_CREATED)
    def aio_connect_vsock(self, cid: int, port: int) -> None:
        c, p = u32(cid), u32(port)
        self._uri = {"transport": "vsock", "host": str(c), "port": p}
        self._start_connect({"vsock": (c, p)})

    def _socket_target(self, sock: int) -> dict[str, Any]:
        fd = index(sock)
        try:
            s = socket.socket(fileno=fd)
        except OSError as e:
            raise self._err("getsockopt", e.errno or _errno.EBADF) from None
        self._uri = None
        return {"sock": s}

    @api(ST_CREATED)
    def connect_socket(self, sock: int) -> None:
        """Take over an already-connected socket (an fd; the handle closes it)."""
        self._connect_blocking(self._socket_target(sock))

    @api(ST_CREATED)
    def aio_connect_socket(self, sock: int) -> None:
        self._start_connect(self._socket_target(sock))

    def _argv(self, argv: Any) -> list[str]:
        args = check_list(argv)
        if not args:
            raise self._err("missing command name in argv list", _errno.EINVAL)
        return args

    @api(ST_CREATED)
    def connect_command(self, argv: list[str]) -> None:
        """Run a server subprocess talking NBD on its stdin/stdout."""
        args = self._argv(argv)
        self._uri = None
        self._connect_blocking({"command": args})

    @api(ST_CREATED)
    def aio_connect_command(self, argv: list[str]) -> None:
        args = self._argv(argv)
        self._uri = None
        self._start_connect({"command": args})

    @api(ST_CREATED)
    def connect_systemd_socket_activation(self, argv: list[str]) -> None:
        """Run a server subprocess with a listening socket passed as fd 3."""
        args = self._argv(argv)
        self._uri = None
        self._connect_blocking({"socket_activation": args})

    @api(ST_CREATED)
    def aio_connect_systemd_socket_activation(self, argv: list[str]) -> None:
        args = self._argv(argv)
        self._uri = None
        self._start_connect({"socket_activation": args})
