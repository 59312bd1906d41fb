"""The nbd plugin: a proxy to another NBD server through pynbd's own client. Its manual page
is :class:`NbdPlugin`'s docstring."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from pynbd.client.engine import AsyncClient
from pynbd.errors import CommandError, ConfigError, NBDError, OptionError
from pynbd.filters._params import absolute_path, parse_bool, parse_int, parse_unsigned
from pynbd.plugin import CacheMode, Extent, Flag, FuaMode, Plugin, ThreadModel
from pynbd.plugins._network_common import log_open_error
from pynbd.protocol.constants import CONTEXT_BASE_ALLOCATION, Cmd, CmdFlag

__all__ = ["NbdPlugin"]

log = logging.getLogger("pynbd.server")

#: sun_path's size (struct sockaddr_un): nbdkit refuses longer socket names up front.
_SUN_PATH = 108
#: Seconds between two connection attempts with retry=N (nbdkit sleeps one second).
RETRY_DELAY = 1.0
_CONNECT_KEYS = ("socket", "hostname", "vsock", "command", "socket-fd", "uri")

# Plain ints on the data path (enum operators are Python functions).
_P_FUA, _P_MAY_TRIM = int(Flag.FUA), int(Flag.MAY_TRIM)
_P_REQ_ONE, _P_FAST_ZERO = int(Flag.REQ_ONE), int(Flag.FAST_ZERO)
_C_FUA, _C_NO_HOLE = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE)
_C_REQ_ONE, _C_FAST_ZERO = int(CmdFlag.REQ_ONE), int(CmdFlag.FAST_ZERO)
_READ, _WRITE = int(Cmd.READ), int(Cmd.WRITE)


class _Target:
    """Where to connect, from the parameters (exactly one way)."""

    def __init__(self) -> None:
        self.uri: str | None = None
        self.socket: str | None = None
        self.hostname: str | None = None
        self.port: str | None = None
        self.vsock: str | None = None
        self.cid = 0
        self.vport = 0
        self.command: list[str] = []
        self.socket_fd = -1

    def count(self) -> int:
        return (bool(self.socket) + bool(self.hostname) + bool(self.uri) + bool(self.command)
                + (self.socket_fd >= 0) + bool(self.vsock))

    def tcp_port(self) -> int:
        """The TCP port: a number, or a service name looked up as nbdkit's libnbd does."""
        port = self.port or "10809"
        if port.isdigit():
            return int(port)
        try:
            return socket.getservbyname(port, "tcp")
        except OSError:
            raise CommandError(
                errno.EINVAL, f"nbd_connect_tcp: getaddrinfo: hostname \"{self.hostname}\" "
                f"port \"{port}\": Servname not supported for ai_socktype") from None

    def describe(self) -> str:
        if self.uri:
            return "nbd_connect_uri"
        if self.socket:
            return "nbd_connect_unix"
        if self.hostname:
            return "nbd_connect_tcp"
        if self.vsock:
            return "nbd_connect_vsock"
        if self.command:
            return "nbd_connect_systemd_socket_activation"
        return "nbd_connect_socket"


class NbdPlugin(Plugin):
    """NAME
        nbd - pynbd nbd plugin (a proxy to another NBD server)

    SYNOPSIS
        pynbd serve nbd { command=COMMAND [arg=ARG [...]] |
                          hostname=HOST [port=PORT] |
                          vsock=CID [port=PORT] |
                          socket=SOCKNAME |
                          socket-fd=FD |
                          [uri=]URI }
                        [dynamic-export=BOOL] [export=NAME] [retry=N] [shared=BOOL]

    DESCRIPTION
        nbd forwards every client to another NBD server: qemu-nbd, nbdkit, nbd-server,
        another pynbd. Filters on the command line then apply to that server's export, and
        the protocol the client sees is pynbd's whatever the server speaks (oldstyle or
        newstyle, with or without structured replies).

        Each client gets its own connection to the server (opened when the client connects)
        unless shared=true, or command= or socket-fd= is used: then one connection, opened
        by the first client, is shared by all of them. The connection is made with pynbd's
        asyncio client: requests from one client travel in parallel, their replies come back
        in any order, and the plugin's callbacks run on the server's event loop.

        What the server advertises is passed on: the size, read-only, flush, FUA, trim,
        write zeroes, fast zero, multi-conn, cache, rotational, the block size constraints,
        the export description, and block status (base:allocation) when the server offers
        it. The flags of each request (FUA, NO_HOLE, FAST_ZERO, REQ_ONE) go through
        unchanged, and the server's errors (ENOSPC, EPERM, ENOTSUP...) reach the client.

        This is nbdkit-nbd-plugin(1) for pynbd: the same parameters, defaults and messages.
        TLS to the server (tls=, tls-certificates=, tls-verify=, tls-username=, tls-psk=) is
        not supported yet: those parameters are refused with a message.

    PARAMETERS
        [uri=]URI
            The server's NBD URI: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH
            or nbd+vsock:///CID[:PORT]/EXPORT. "uri=" may be omitted (the magic parameter).

        socket=SOCKNAME
            The server's Unix socket (made absolute when the server starts).

        hostname=HOST
        port=PORT
            The server's TCP address; PORT is a number or a service name (default 10809).

        vsock=CID
        port=PORT
            The server's AF_VSOCK address (cid= is a synonym of vsock=).

        command=COMMAND
        arg=ARG
            Run COMMAND with each arg= as an argument, as a server by systemd socket
            activation (qemu-nbd, nbdkit, pynbd serve...): it gets a listening socket as fd 3.
            It is stopped when pynbd exits. Implies shared=true.

        socket-fd=FD
            An already connected socket inherited as file descriptor FD. Implies
            shared=true.

        export=NAME
            The export to ask the server for (default ""); with uri= the URI's export is used.

        dynamic-export=true
            Ask the server for the export the client asked for (and list the server's exports
            to clients). Not with export= or a shared connection.

        retry=N
            Try N more times, a second apart, if connecting fails (default 0).

        shared=true
            One connection to the server for every client (default false).

    EXAMPLES
        Add filters to qemu-nbd serving a qcow2 file:

            pynbd serve --filter=partition nbd command=qemu-nbd arg=-f arg=qcow2 \\
                arg=/path/to/disk.qcow2 partition=1

        Make a server on a Unix socket reachable over TCP, read-only:

            pynbd serve -r nbd socket=/tmp/nbd.sock

        Pass the client's export name through:

            pynbd serve nbd nbd://server.example.com dynamic-export=true
    """

    name = "nbd"
    version = "1.0"
    magic_config_key = "uri"
    thread_model = ThreadModel.PARALLEL
    config_help = (
        "[uri=]<URI>            URI of an NBD socket to connect to (if supported).\n"
        "socket=<SOCKNAME>      The Unix socket to connect to.\n"
        "hostname=<HOST>        The hostname for the TCP socket to connect to.\n"
        "port=<PORT>            TCP/VSOCK port or service name to use (default 10809).\n"
        "vsock=<CID>            The cid for the VSOCK socket to connect to.\n"
        "command=<COMMAND>      Command to run.\n"
        "arg=<ARG>              Parameters for command.\n"
        "socket-fd=<FD>         Socket file descriptor to connect to.\n"
        "export=<NAME>          Export name to connect to (default \"\").\n"
        "dynamic-export=<BOOL>  True to enable export name pass-through.\n"
        "retry=<N>              Retry connection up to N seconds (default 0).\n"
        "shared=<BOOL>          True to share one server connection among all clients,\n"
        "                       rather than a connection per client (default false)."
    )

    def __init__(self) -> None:
        self.target = _Target()
        self.export: str | None = None
        self.dynamic_export = False
        self.retry = 0
        self.shared = False
        self._shared: AsyncClient | None = None
        self._shared_lock: asyncio.Lock | None = None
        self._shared_failed: BaseException | None = None

    # Configuration ---------------------------------------------------------------------
    def config(self, key: str, value: str) -> None:
        t = self.target
        if key == "socket":
            t.socket = absolute_path(value)
        elif key == "hostname":
            t.hostname = value
        elif key == "port":
            t.port = value
        elif key in ("vsock", "cid"):
            t.vsock = value
        elif key == "uri":
            t.uri = value
        elif key in ("command", "arg"):
            t.command.append(value)
        elif key == "socket-fd":
            t.socket_fd = parse_int("socket-fd", value)
            if t.socket_fd < 0:
                raise ConfigError("socket-fd must be >= 0")
        elif key == "export":
            self.export = value
        elif key == "dynamic-export":
            self.dynamic_export = parse_bool(value)
        elif key == "retry":
            self.retry = parse_unsigned("retry", value)
        elif key == "shared":
            self.shared = parse_bool(value)
        elif key in ("tls", "tls-certificates", "tls-verify", "tls-username", "tls-psk"):
            raise ConfigError(f"{key}: TLS to the NBD server is not supported by pynbd yet")
        else:
            raise ConfigError(f"unknown parameter '{key}'")

    def config_complete(self) -> None:
        t = self.target
        n = t.count()
        if n > 1:
            raise ConfigError("cannot mix Unix ‘socket’, TCP ‘hostname’/‘port’, ‘vsock’, "
                              "‘command’, ‘socket-fd’ and ‘uri’ parameters")
        if n == 0:
            raise ConfigError("exactly one of ‘socket’, ‘hostname’, ‘vsock’, ‘command’, "
                              "‘socket-fd’ and ‘uri’ parameters must be specified")
        if t.port and not (t.hostname or t.vsock):
            raise ConfigError("‘port’ parameter should only be used with ‘hostname’ or "
                              "‘vsock’")
        if t.socket and len(t.socket) > _SUN_PATH:
            raise ConfigError("socket file name too large")
        if t.vsock:
            t.cid = _parse_uint32("vsock_cid", t.vsock)
            t.vport = _parse_uint32("port", t.port or "10809")
        if t.command or t.socket_fd >= 0:
            self.shared = True
        if self.dynamic_export:
            if self.export is not None:
                raise ConfigError("cannot mix 'dynamic-export' with explicit export name")
            if self.shared:
                raise ConfigError("cannot use 'dynamic-export' with shared connection")
        elif self.export is None:
            self.export = ""
        if t.socket_fd >= 0:
            try:
                mode = os.fstat(t.socket_fd).st_mode
            except OSError as e:
                raise ConfigError(f"socket-fd: {t.socket_fd}: {e.strerror}") from None
            if not stat.S_ISSOCK(mode):
                raise ConfigError(f"socket-fd: {t.socket_fd}: not a socket")

    def dump_plugin(self) -> list[str]:
        return ["libnbd_version=pynbd", "libnbd_tls=0", "libnbd_uri=1",
                f"libnbd_vsock={int(hasattr(socket, 'AF_VSOCK'))}", "libnbd_dynamic_list=1"]

    def cleanup(self) -> None:
        client, self._shared = self._shared, None
        if client is not None:
            _drop(client)

    # Connecting ------------------------------------------------------------------------
    async def _connect(self, export: str, opt_mode: bool = False,
                       full_info: bool = True) -> AsyncClient:
        """A connection to the server (retrying as retry= says), negotiated up to
        transmission unless ``opt_mode``."""
        t = self.target
        kw: dict[str, Any] = {"export_name": export, "opt_mode": True}
        if t.uri:
            kw["uri"] = t.uri
        elif t.socket:
            kw["unix"] = t.socket
        elif t.hostname:
            kw["host"], kw["port"] = t.hostname, t.tcp_port()
        elif t.vsock:
            kw["vsock"] = (t.cid, t.vport)
        elif t.command:
            kw["socket_activation"] = list(t.command)
        else:
            kw["sock"] = socket.socket(fileno=os.dup(t.socket_fd))
        tries = self.retry
        while True:
            try:
                c = await AsyncClient.connect(**kw)
                if t.uri and not self.dynamic_export:
                    export = c.export.name
                break
            except (OSError, NBDError, ValueError) as e:
                if tries <= 0 or "sock" in kw:
                    raise _connect_error(t.describe(), e) from None
                tries -= 1
                log.debug("nbd: connect failed; will try again: %s", e)
                await asyncio.sleep(RETRY_DELAY)
        if not c.connected and not opt_mode:
            c.full_info = full_info
            try:
                await c.opt_go(export)
            except (OSError, NBDError) as e:
                await c.close()
                raise _connect_error(t.describe(), e) from None
        return c

    def _client_export(self, export_name: str) -> str:
        if self.dynamic_export:
            return export_name
        assert self.export is not None
        return self.export

    async def _shared_client(self) -> AsyncClient:
        if self._shared_lock is None:
            self._shared_lock = asyncio.Lock()
        async with self._shared_lock:
            if self._shared is None or self._shared.failure is not None or \
                    self._shared.closed:
                self._shared = await self._connect(self._client_export(""))
            return self._shared

    # Connection ------------------------------------------------------------------------
    async def list_exports(self, readonly: bool,
                           is_tls: bool) -> list[tuple[str, str]] | None:
        if not self.dynamic_export:
            return None
        c = await self._connect("", opt_mode=True)
        try:
            return [(name, desc) for name, desc in await c.opt_list()]
        except (OSError, NBDError) as e:
            raise CommandError(getattr(e, "errno", None) or errno.EIO,
                               f"nbd_opt_list: {e}") from None
        finally:
            await c.opt_abort()

    async def default_export(self, readonly: bool, is_tls: bool) -> str | None:
        if not self.dynamic_export:
            return self.export
        try:
            c = await self._connect("", opt_mode=True)
        except (OSError, NBDError):
            return ""
        try:
            c.full_info = True
            info = await c.opt_info("")
            return info.canonical_name or ""
        except (OSError, NBDError):
            return ""
        finally:
            await c.opt_abort()

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> _Handle:
        try:
            return await self._open(readonly, export_name)
        except CommandError as e:
            log_open_error(self.name, e)
            raise

    async def _open(self, readonly: bool, export_name: str) -> _Handle:
        if self.shared:
            return _Handle(await self._shared_client(), readonly, shared=True)
        return _Handle(await self._connect(self._client_export(export_name)), readonly)

    async def close(self, h: _Handle) -> None:
        if not h.shared:
            await h.c.close()

    # Export properties -----------------------------------------------------------------
    def get_size(self, h: _Handle) -> int:
        return h.c.size

    def export_description(self, h: _Handle) -> str | None:
        return h.c.export.description

    def block_size(self, h: _Handle) -> tuple[int, int, int] | None:
        return h.c.export.block_size

    def can_write(self, h: _Handle) -> bool:
        return not (h.c.is_read_only() or h.readonly)

    def can_flush(self, h: _Handle) -> bool:
        return h.c.can_flush()

    def is_rotational(self, h: _Handle) -> bool:
        return h.c.is_rotational()

    def can_trim(self, h: _Handle) -> bool:
        return h.c.can_trim()

    def can_zero(self, h: _Handle) -> bool:
        return h.c.can_zero()

    def can_fast_zero(self, h: _Handle) -> bool:
        return h.c.can_fast_zero()

    def can_fua(self, h: _Handle) -> FuaMode:
        return FuaMode.NATIVE if h.c.can_fua() else FuaMode.NONE

    def can_multi_conn(self, h: _Handle) -> bool:
        return h.c.can_multi_conn()

    def can_cache(self, h: _Handle) -> CacheMode:
        return CacheMode.NATIVE if h.c.can_cache() else CacheMode.NONE

    def can_extents(self, h: _Handle) -> bool:
        return h.c.can_meta_context(CONTEXT_BASE_ALLOCATION)

    # Data ------------------------------------------------------------------------------
    async def pread(self, h: _Handle, count: int, offset: int, flags: int) -> bytearray:
        buf = bytearray(count)
        await h.c.pread_into(buf, offset)
        return buf

    # The event loop's fast path (pynbd.server.coroutines): with the plugin alone in the
    # chain, READ and WRITE go to the server without a task or a future of their own; the
    # replies call ``done`` from the client's reader. Many requests travel at once on the
    # connection, as many as the client sent.
    def start_pread(self, h: _Handle, count: int, offset: int, flags: int,
                    done: Callable[[BaseException | None, Any], None]) -> None:
        buf = bytearray(count)

        def finished(p: Any) -> None:
            done(_failure(p), buf)

        h.c.submit(_READ, offset, count, 0, dest=memoryview(buf), done=finished)
        h.c.write_soon()

    def start_pwrite(self, h: _Handle, buf: memoryview, offset: int, flags: int,
                     done: Callable[[BaseException | None, Any], None]) -> None:
        def finished(p: Any) -> None:
            done(_failure(p), None)

        h.c.submit(_WRITE, offset, len(buf), _C_FUA if flags & _P_FUA else 0, payload=buf,
                   done=finished)
        h.c.write_soon()

    async def pwrite(self, h: _Handle, buf: memoryview, offset: int, flags: int) -> None:
        await h.c.pwrite(buf, offset, _C_FUA if flags & _P_FUA else 0)

    async def flush(self, h: _Handle, flags: int) -> None:
        await h.c.flush()

    async def trim(self, h: _Handle, count: int, offset: int, flags: int) -> None:
        await h.c.trim(count, offset, _C_FUA if flags & _P_FUA else 0)

    async def zero(self, h: _Handle, count: int, offset: int, flags: int) -> None:
        f = 0 if flags & _P_MAY_TRIM else _C_NO_HOLE
        if flags & _P_FUA:
            f |= _C_FUA
        if flags & _P_FAST_ZERO:
            f |= _C_FAST_ZERO
        await h.c.zero(count, offset, f)

    async def extents(self, h: _Handle, count: int, offset: int, flags: int) -> list[Extent]:
        got = await h.c.block_status(count, offset, _C_REQ_ONE if flags & _P_REQ_ONE else 0)
        out: list[Extent] = []
        pos = offset
        for length, typ in got.get(CONTEXT_BASE_ALLOCATION, ()):
            out.append((pos, length, typ & 3))
            pos += length
        if not out:
            raise CommandError(errno.EIO, "nbd: the server sent no base:allocation extents")
        return out

    async def cache(self, h: _Handle, count: int, offset: int, flags: int) -> None:
        await h.c.cache(count, offset)


class _Handle:
    """One client's view of a server connection."""

    __slots__ = ("c", "readonly", "shared")

    def __init__(self, c: AsyncClient, readonly: bool, shared: bool = False) -> None:
        self.c = c
        self.readonly = readonly
        self.shared = shared


def _failure(p: Any) -> BaseException | None:
    """What a finished command of the fast path failed with (None: it succeeded)."""
    if p.failure is not None:
        return p.failure  # type: ignore[no-any-return]
    if p.error:
        return CommandError(p.error, p.message or os.strerror(p.error))
    return None


def _parse_uint32(what: str, text: str) -> int:
    value = parse_unsigned(what, text) if text.strip()[:1] != "-" else parse_int(what, text)
    if value < 0:
        raise ConfigError(f"{what}: negative numbers are not allowed")
    return value


def _connect_error(what: str, e: BaseException) -> CommandError:
    """A failed connection as nbdkit words it: ``nbd_connect_unix: connect: ...``."""
    if isinstance(e, CommandError):
        return e
    if isinstance(e, OSError) and e.errno:
        text = f"{what}: connect: {e.strerror}"
        return CommandError(e.errno, text)
    if isinstance(e, OptionError):
        return CommandError(errno.ENOENT, f"{what}: handshake: {e}")
    return CommandError(errno.EIO, f"{what}: {e}")


def _drop(client: AsyncClient) -> None:
    """Close a client at exit, from outside its event loop (which may be gone): the server it
    started (command=) is stopped."""
    loop = client.loop
    try:
        if loop is not None and not loop.is_closed() and loop.is_running():
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(10)
            return
    except Exception:  # noqa: BLE001, S110 - fall back to dropping it
        pass
    proc = getattr(client, "_proc", None)
    try:
        if client.stream is not None:
            client.stream.close()
    except Exception:  # noqa: BLE001, S110
        pass
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except Exception:  # noqa: BLE001
            proc.kill()
            proc.wait()
