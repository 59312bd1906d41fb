"""The ssh plugin: a disk image on an SSH server, over SFTP. Its manual page is
:class:`SshPlugin`'s docstring."""

from __future__ import annotations

import asyncio
import errno
import getpass
import logging
import os
import socket
import warnings
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import parse_bool, parse_size, parse_unsigned
from pynbd.plugin import Flag, FuaMode, Plugin, ThreadModel
from pynbd.plugins._network_common import log_open_error, read_password

__all__ = ["SshPlugin"]

log = logging.getLogger("pynbd.server")

#: The identity files libssh tries after those given with identity= (in this order).
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa", "id_dsa")
#: Largest SFTP read or write sent as one request (OpenSSH's sftp-server takes 256 KiB).
SFTP_BLOCK = 255 * 1024
#: SFTP requests in flight per NBD request (asyncssh splits big reads and writes).
SFTP_MAX_REQUESTS = 16
#: The largest SSH packet the server may send (the default is 32 KiB): a 255 KiB SFTP read
#: reply comes in one or two packets instead of eight, each of which costs Python-level work.
SSH_MAX_PACKET = 256 * 1024
#: The channel window (asyncssh's default): room for eight such replies in flight. A larger
#: one lets the data pile up in sshd's buffers and in asyncssh's receive buffer, and both
#: copy what is left behind each packet they take off: with 8 MiB both sides spent a third
#: more CPU per byte, with 16 MiB twice as much (benchmarks/network.py --only ssh).
SSH_WINDOW = 2 * 1024 * 1024
#: Ciphers tried first unless the ssh configuration has a Ciphers line: AES-GCM runs in
#: hardware (AES-NI) through OpenSSL on both sides. Measured against aes128-gcm for SFTP
#: reads: chacha20-poly1305 (asyncssh's and libssh's first choice) costs ~40% more CPU per
#: byte here and ~70% more in sshd; aes128-ctr with hmac-sha2-256-etm ~90% and ~70% more.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_P_FUA = int(Flag.FUA)

_UNKNOWN_HOST = (
    "either the host key is unknown, you must use ssh first and accept the host key; or the "
    "known_hosts file (usually ~/.ssh/known_hosts) could not be opened, check that the file "
    "exists and file permissions")


def _asyncssh() -> Any:
    """asyncssh, imported without the deprecation warnings its imports of cryptography
    print with recent cryptography releases."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import asyncssh
    return asyncssh


class _Handle:
    __slots__ = ("conn", "file", "reader", "readonly", "sftp")

    def __init__(self, conn: Any, sftp: Any, file: Any, readonly: bool) -> None:
        self.conn = conn
        self.sftp = sftp
        self.file = file
        self.readonly = readonly
        #: The reads' own SFTP channel (None: reads go through asyncssh's client).
        self.reader: Any = None


class SshPlugin(Plugin):
    """NAME
        ssh - pynbd ssh plugin (a disk image on an SSH server, over SFTP)

    SYNOPSIS
        pynbd serve ssh host=HOST [path=]PATH
                        [compression=true] [config=CONFIG_FILE]
                        [create=true] [create-mode=MODE] [create-size=SIZE]
                        [identity=FILENAME] [known-hosts=FILENAME]
                        [password=PASSWORD|-|+FILENAME|-FD]
                        [port=PORT] [timeout=SECS] [user=USER]
                        [verify-remote-host=false]

    DESCRIPTION
        ssh serves a file on any SSH server that offers SFTP (OpenSSH's does) as a disk.
        Each client gets its own SSH connection; reads and writes are SFTP requests, big ones
        split into several requests in flight at once, and flush is OpenSSH's
        fsync@openssh.com extension (when the server offers it; FUA writes are followed by
        one). Relative paths are relative to the remote user's home directory.

        SSH is done with asyncssh, on the server's event loop: one connection carries many
        requests at once without a thread per request. Reads go through a second SFTP
        session on the same SSH connection, spoken by pynbd itself: the data goes from each
        SSH packet straight into the NBD reply. The server may send SSH packets of up to
        256 KiB with a 2 MiB window, and the AES-GCM ciphers are offered first (they run in
        hardware, for sshd too) unless the ssh configuration has a Ciphers line: put one in
        the file given with config= to choose others.

        The server's host key must be in the known hosts file (by default ~/.ssh/known_hosts,
        then /etc/ssh/ssh_known_hosts) unless verify-remote-host=false; otherwise the client
        is refused with nbdkit's message ("host key for server changed", or "either the
        host key is unknown..."). Authentication is by public key (identity= files, then
        ~/.ssh/id_ed25519, id_ecdsa, id_rsa, an ssh-agent) or password; when all fail the
        client is refused with "all possible authentication methods failed".

        This is nbdkit-ssh-plugin(1) for pynbd: the same parameters and messages.

    PARAMETERS
        host=HOST
            The SSH server. Required.

        [path=]PATH
            The remote file. Required; "path=" may be omitted.

        port=PORT
            The SSH port (a number or a service name; default 22, or the config file's).

        user=USER
            The remote user (default: the local user, or the config file's).

        password=PASSWORD
        password=-
        password=+FILENAME
        password=-FD
            Log in with this password (asked on the terminal, read from a file or an
            inherited file descriptor).

        identity=FILENAME
            A private key to try first (repeatable). %d (~/.ssh), %u (local user), %l (local
            host), %h (remote host), %r (remote user), %p (port) and %% are expanded.

        known-hosts=FILENAME
            The known hosts file (the same % expansions).

        verify-remote-host=false
            Do not check the server's host key (dangerous: anyone in the middle can pose as
            the server).

        config=CONFIG_FILE
        config=
            Read SSH client settings (Host, HostName, User, Port, IdentityFile...) from this
            file instead of ~/.ssh/config; empty: read none.

        compression=true
            Compress the SSH connection (only worth it on slow links).

        timeout=SECS
            The connection timeout.

        create=true
        create-size=SIZE
        create-mode=MODE
            Create (or replace) the remote file when the first client connects, SIZE bytes
            long, with permissions MODE (octal, default 0600).

    EXAMPLES
        Serve a disk image from a host you have logged in to before:

            pynbd serve ssh host=server.example.com /var/tmp/disk.img

        As another user, with a key and a known hosts file of your own:

            pynbd serve ssh host=server port=2222 user=bob identity=/home/me/.ssh/bob \\
                known-hosts=/home/me/known_hosts disk.img

        Create a new 10G file on the server and serve it:

            pynbd serve ssh host=server disk.img create=true create-size=10G
    """

    name = "ssh"
    version = "1.0"
    magic_config_key = "path"
    thread_model = ThreadModel.PARALLEL
    config_help = (
        "host=<HOST>     (required) SSH server hostname.\n"
        "[path=]<PATH>   (required) SSH remote path.\n"
        "port=<PORT>                SSH protocol port number.\n"
        "user=<USER>                SSH user name.\n"
        "password=<PASSWORD>        SSH password.\n"
        "config=<CONFIG>            Alternate local SSH configuration file.\n"
        "compression=true           Enable compression.\n"
        "identity=<FILENAME>        Prepend private key (identity) file.\n"
        "known-hosts=<FILENAME>     Set location of known_hosts file.\n"
        "timeout=<TIMEOUT>          Set SSH connection timeout.\n"
        "verify-remote-host=false   Ignore known_hosts.\n"
        "create=true                Create the remote file.\n"
        "create-mode=<MODE>         Set the permissions of the remote file.\n"
        "create-size=<SIZE>         Set the size of the remote file."
    )

    def __init__(self) -> None:
        self.host: str | None = None
        self.path: str | None = None
        self.port: str | None = None
        self.user: str | None = None
        self.password: str | None = None
        self.config_file: str | None = None
        self.compression = False
        self.identities: list[str] = []
        self.known_hosts: str | None = None
        self.timeout = 0
        self.verify_remote_host = True
        self.create = False
        self.create_mode = 0o600
        self.create_size: int | None = None
        self._created = False
        self._create_lock: asyncio.Lock | None = None

    # Configuration ---------------------------------------------------------------------
    def config(self, key: str, value: str) -> None:
        if key == "host":
            self.host = value
        elif key == "path":
            self.path = value
        elif key == "port":
            self.port = value
        elif key == "user":
            self.user = value
        elif key == "password":
            self.password = read_password(value)
        elif key == "config":
            self.config_file = value
        elif key == "compression":
            self.compression = parse_bool(value)
        elif key == "identity":
            self.identities.append(value)
        elif key == "known-hosts":
            self.known_hosts = value
        elif key == "timeout":
            self.timeout = parse_unsigned("timeout", value)
        elif key == "verify-remote-host":
            self.verify_remote_host = parse_bool(value)
        elif key == "create":
            self.create = parse_bool(value)
        elif key == "create-size":
            self.create_size = parse_size(value)
        elif key == "create-mode":
            self.create_mode = parse_unsigned("create-mode", value)
        else:
            raise ConfigError(f"unknown parameter '{key}'")

    def config_complete(self) -> None:
        if not self.host or not self.path:
            raise ConfigError("you must supply the host and path parameters "
                              "after the plugin name on the command line")
        if self.create and self.create_size is None:
            raise ConfigError("if using create=true, you must specify the size of the new "
                              "remote file using create-size=SIZE")

    def get_ready(self) -> None:
        _asyncssh()  # imported now, not while the first client waits

    # Connecting ------------------------------------------------------------------------
    def _port(self) -> int | None:
        if self.port is None:
            return None
        if self.port.isdigit():
            return int(self.port)
        try:
            return socket.getservbyname(self.port, "tcp")
        except OSError:
            raise CommandError(errno.EINVAL, f"unknown port: {self.port}") from None

    def _expand(self, text: str, user: str, port: int) -> str:
        """libssh's % expansions in identity=, known-hosts= and config=."""
        subs = {"d": os.path.expanduser("~/.ssh"), "u": getpass.getuser(),
                "l": socket.gethostname(), "h": self.host or "", "r": user, "p": str(port),
                "%": "%"}
        out, i = [], 0
        while i < len(text):
            c = text[i]
            if c == "%" and i + 1 < len(text) and text[i + 1] in subs:
                out.append(subs[text[i + 1]])
                i += 2
            else:
                out.append(c)
                i += 1
        return os.path.expanduser("".join(out))

    def _options(self) -> dict[str, Any]:
        """asyncssh.connect's keyword arguments for the parameters."""
        asyncssh = _asyncssh()
        port = self._port()
        user = self.user or getpass.getuser()
        shown_port = port or 22
        kw: dict[str, Any] = {"port": port or (), "username": self.user or (),
                              "preferred_auth": "publickey,password"}
        if self.config_file is not None:
            kw["config"] = [self._expand(self.config_file, user, shown_port)] \
                if self.config_file else None
        if not self.verify_remote_host:
            kw["known_hosts"] = None
        elif self.known_hosts is not None:
            kw["known_hosts"] = self._expand(self.known_hosts, user, shown_port)
        else:
            kw["known_hosts"] = [p for p in (os.path.expanduser("~/.ssh/known_hosts"),
                                             "/etc/ssh/ssh_known_hosts") if os.path.exists(p)]
        if self.identities:
            keys = [self._expand(p, user, shown_port) for p in self.identities]
            keys += [p for p in (os.path.expanduser(f"~/.ssh/{n}") for n in DEFAULT_IDENTITIES)
                     if os.path.exists(p)]
            kw["client_keys"] = keys
        if self.password is not None:
            kw["password"] = self.password
        kw["compression_algs"] = ["zlib@openssh.com", "zlib"] if self.compression else ["none"]
        if self.timeout:
            kw["connect_timeout"] = self.timeout
        kw["agent_path"] = () if os.environ.get("SSH_AUTH_SOCK") else None
        kw["max_pktsize"], kw["window"] = SSH_MAX_PACKET, SSH_WINDOW
        if not _configures_ciphers(kw.get("config", ())):
            from asyncssh.encryption import get_default_encryption_algs

            algs = [a.decode() for a in get_default_encryption_algs()]
            kw["encryption_algs"] = [a for a in PREFERRED_CIPHERS if a in algs] + \
                [a for a in algs if a not in PREFERRED_CIPHERS]
        _ = asyncssh
        return kw

    async def _connect(self) -> Any:
        asyncssh = _asyncssh()
        kw = self._options()
        try:
            return await asyncssh.connect(self.host, **kw)
        except asyncssh.HostKeyNotVerifiable:
            raise CommandError(errno.EPERM, self._host_key_problem(kw)) from None
        except asyncssh.PermissionDenied:
            raise CommandError(errno.EPERM,
                               "all possible authentication methods failed") from None
        except (OSError, asyncssh.Error, ValueError) as e:
            raise CommandError(getattr(e, "errno", None) or errno.EIO,
                               f"failed to connect to remote host: {self.host}: "
                               f"{getattr(e, 'reason', None) or e}") from None

    def _host_key_problem(self, kw: dict[str, Any]) -> str:
        """nbdkit's words: "changed" when the known hosts name this host with another key,
        else "unknown"."""
        asyncssh = _asyncssh()
        files = kw.get("known_hosts") or []
        if isinstance(files, str):
            files = [files]
        port = kw.get("port") or 22
        for path in files:
            try:
                known = asyncssh.read_known_hosts(path)
                trusted = known.match(self.host or "", "", port)[0]
            except (OSError, ValueError, asyncssh.Error):
                continue
            if trusted:
                return "host key for server changed"
        return _UNKNOWN_HOST

    async def _create_file(self, sftp: Any) -> None:
        """create=true: make (or truncate) the file at its size, once per server."""
        asyncssh = _asyncssh()
        if self._create_lock is None:
            self._create_lock = asyncio.Lock()
        async with self._create_lock:
            if self._created:
                return
            attrs = asyncssh.SFTPAttrs(permissions=self.create_mode)
            try:
                async with await sftp.open(self.path, "wb", attrs) as f:
                    await f.truncate(self.create_size)
            except asyncssh.SFTPError as e:
                raise CommandError(_sftp_errno(e), f"cannot create file: SFTP server: "
                                                   f"{e.reason}") from None
            self._created = True

    # Connection ------------------------------------------------------------------------
    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> _Handle:
        try:
            return await self._open(readonly, export_name)
        except CommandError as e:
            log_open_error(self.name, e)
            raise

    async def _open(self, readonly: bool, export_name: str) -> _Handle:
        asyncssh = _asyncssh()
        conn = await self._connect()
        try:
            try:
                sftp = await conn.start_sftp_client()
            except (OSError, asyncssh.Error) as e:
                raise CommandError(errno.EIO, f"failed to initialize sftp session: "
                                              f"{getattr(e, 'reason', None) or e}") from None
            if self.create and not readonly:
                await self._create_file(sftp)
            mode = "rb" if readonly else "r+b"
            try:
                f = await sftp.open(self.path, mode, block_size=SFTP_BLOCK,
                                    max_requests=SFTP_MAX_REQUESTS)
            except asyncssh.SFTPError as e:
                how = "reading" if readonly else "writing"
                raise CommandError(_sftp_errno(e), f"cannot open file for {how}: "
                                                   f"SFTP server: {e.reason}") from None
            h = _Handle(conn, sftp, f, readonly)
            h.reader = await self._open_reader(conn, sftp)
            return h
        except BaseException:
            conn.close()
            raise

    async def _open_reader(self, conn: Any, sftp: Any) -> Any:
        """The SFTP channel the reads go through (see :mod:`._sftp_reader`), or None if
        the server will not open a second one (reads then use asyncssh's client)."""
        from pynbd.plugins._sftp_reader import SftpReader

        limit = getattr(sftp.limits, "max_read_len", 0) or SFTP_BLOCK
        block = min(SFTP_BLOCK, limit)
        try:
            _, reader = await conn.create_session(lambda: SftpReader(block),
                                                  subsystem="sftp", encoding=None)
            path = self.path or ""
            await reader.open(path.encode("utf-8", "surrogateescape"))
        except (OSError, CommandError, _asyncssh().Error) as e:
            log.debug("ssh: reads through asyncssh's SFTP client: %s", e)
            return None
        return reader

    async def close(self, h: _Handle) -> None:
        if h.reader is not None:
            await h.reader.close()
        try:
            await h.file.close()
        except Exception:  # noqa: BLE001, S110 - the connection may be gone already
            pass
        h.sftp.exit()
        h.conn.close()
        await h.conn.wait_closed()

    # Export properties -----------------------------------------------------------------
    async def get_size(self, h: _Handle) -> int:
        asyncssh = _asyncssh()
        try:
            attrs = await h.file.stat()
        except asyncssh.SFTPError as e:
            raise CommandError(_sftp_errno(e), f"fstat failed: {e.reason}") from None
        if attrs.size is None:
            raise CommandError(errno.EIO, "fstat failed: the server sent no file size")
        return int(attrs.size)

    def can_write(self, h: _Handle) -> bool:
        return not h.readonly

    def can_flush(self, h: _Handle) -> bool:
        return bool(getattr(h.sftp._handler, "_supports_fsync", False))

    def can_fua(self, h: _Handle) -> FuaMode:
        return FuaMode.EMULATE if self.can_flush(h) else FuaMode.NONE

    def can_multi_conn(self, h: _Handle) -> bool:
        # Every connection writes the same remote file; fsync@openssh.com makes a flush on
        # one connection cover the writes of all (nbdkit advertises it too).
        return True

    # Data ------------------------------------------------------------------------------
    def start_pread(self, h: _Handle, count: int, offset: int, flags: int,
                    done: Any) -> None:
        """A read on the loop (the server's fast path), through the reads' channel."""
        if h.reader is not None:
            h.reader.start_read(count, offset, done)
            return
        task = asyncio.ensure_future(self.pread(h, count, offset, flags))

        def finished(t: asyncio.Task[Any]) -> None:
            if t.cancelled():
                done(ConnectionError("request cancelled"), None)
            elif t.exception() is not None:
                done(t.exception(), None)
            else:
                done(None, t.result())
        task.add_done_callback(finished)

    async def pread(self, h: _Handle, count: int, offset: int, flags: int) -> Any:
        if h.reader is not None:
            return await h.reader.read(count, offset)
        asyncssh = _asyncssh()
        try:
            data: bytes = await h.file.read(count, offset)
        except asyncssh.SFTPError as e:
            raise CommandError(_sftp_errno(e), f"read failed: {e.reason}") from None
        if len(data) != count:
            raise CommandError(errno.EIO, "read failed: unexpected end of file")
        return data

    async def pwrite(self, h: _Handle, buf: memoryview, offset: int, flags: int) -> None:
        asyncssh = _asyncssh()
        try:
            await h.file.write(bytes(buf), offset)
        except asyncssh.SFTPError as e:
            raise CommandError(_sftp_errno(e), f"write failed: {e.reason}") from None

    async def flush(self, h: _Handle, flags: int) -> None:
        asyncssh = _asyncssh()
        try:
            await h.file.fsync()
        except asyncssh.SFTPError as e:
            raise CommandError(_sftp_errno(e), f"fsync failed: {e.reason}") from None


def _configures_ciphers(config: Any) -> bool:
    """Whether the ssh configuration asyncssh reads (``config``: a list of files, () for
    ~/.ssh/config, None for none) chooses the ciphers itself."""
    if config is None:
        return False
    paths = config or [os.path.expanduser("~/.ssh/config")]
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                if any(line.strip().lower().startswith("ciphers") for line in f):
                    return True
        except OSError:
            continue
    return False


def _sftp_errno(e: Any) -> int:
    """An errno for an SFTP status code."""
    return {2: errno.ENOENT, 3: errno.EPERM, 4: errno.EIO, 8: errno.ENOTSUP,
            11: errno.EEXIST, 14: errno.ENOSPC, 15: errno.EDQUOT}.get(getattr(e, "code", 0),
                                                                      errno.EIO)
