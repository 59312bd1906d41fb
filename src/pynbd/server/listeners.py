"""Where ``pynbd serve`` listens (-U, -p/-i, --vsock, a private ``-U -``) and its URI."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass, field

from pynbd.errors import ConfigError
from pynbd.protocol.uri import NBDURI, format_uri
from pynbd.server.options import Options
from pynbd.server.server import bind_tcp, bind_vsock

__all__ = ["Listening", "listen", "listen_unix", "make_uri"]

#: Pending connections the kernel queues on a listener.
BACKLOG = 128


@dataclass
class Listening:
    """The sockets a server accepts on, and what its URI needs to know about them."""

    sockets: list[socket.socket] = field(default_factory=list)
    #: The private directory of ``-U -`` (removed by :meth:`close`).
    tmpdir: str | None = None
    unix_path: str | None = None
    port: int | None = None
    vsock_port: int | None = None

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def _in_use(path: str) -> ConfigError:
    # nbdkit's words (its perror of bind): "PATH: Address already in use".
    return ConfigError(f"{path}: {os.strerror(errno.EADDRINUSE)}")


def _is_stale(path: str) -> bool:
    """True when PATH is a socket file nobody listens on (a crashed server's leftover)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False  # a regular file or a directory is never ours to remove
    except FileNotFoundError:
        return True
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a live server with a full backlog answers EAGAIN, not a hang
    try:
        code = probe.connect_ex(path)
    finally:
        probe.close()
    return code in (errno.ECONNREFUSED, errno.ENOENT)


def listen_unix(path: str) -> socket.socket:
    """Listen on Unix socket PATH, replacing a stale socket file but never a live server's."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            s.bind(path)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            if not _is_stale(path):
                raise _in_use(path) from None
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            try:
                s.bind(path)
            except OSError as e2:
                if e2.errno == errno.EADDRINUSE:  # another server took it meanwhile
                    raise _in_use(path) from None
                raise
        s.listen(BACKLOG)
    except BaseException:
        s.close()
        raise
    return s


def listen(o: Options) -> Listening:
    """Bind what the options ask for (a private Unix socket when only --run is given)."""
    where = Listening()
    try:
        if o.unix is None and o.port is None and o.run is not None and not o.vsock:
            o.unix = "-"
        if o.unix is not None:
            if o.unix == "-":
                where.tmpdir = tempfile.mkdtemp(prefix="pynbd")
                where.unix_path = os.path.join(where.tmpdir, "socket")
            else:
                where.unix_path = o.unix
            where.sockets = [listen_unix(where.unix_path)]
        elif o.vsock:
            where.vsock_port = int(o.port) if o.port is not None else 10809
            where.sockets = [bind_vsock(where.vsock_port)]
        else:
            port = int(o.port) if o.port is not None and o.port.isdigit() else (
                socket.getservbyname(o.port, "tcp") if o.port else 10809)
            where.sockets = bind_tcp(port, o.ip_addr, o.family)
            where.port = where.sockets[0].getsockname()[1] if port == 0 else port
    except ConfigError:
        where.close()
        raise
    except OSError as e:
        where.close()
        raise ConfigError(f"cannot listen: {e.strerror or e}") from None
    return where


def make_uri(o: Options, unix_path: str | None, port: int | None, vsock_port: int | None) -> str:
    """The URI clients use, as nbdkit's ``$uri`` spells it (the port always written)."""
    tls = o.tls == "require"  # nbds:// (as nbdkit: with --tls=on, plain nbd:// works)
    if unix_path is not None:
        u = NBDURI(transport="unix", socket=unix_path, export=o.export, tls=tls)
    elif vsock_port is not None:
        u = NBDURI(transport="vsock", host="1", port=vsock_port, export=o.export, tls=tls)
    else:
        u = NBDURI(transport="tcp", host=o.ip_addr or "localhost", port=port or 10809,
                   export=o.export, tls=tls)
    uri = format_uri(u, always_port=True)
    # nbdkit writes no "/" after the authority when the export name is empty
    return uri[:-1] if u.transport != "unix" and not o.export else uri
