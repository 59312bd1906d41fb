"""TLS for the client: what a connection asks for (:class:`TLSConfig`), the SSL context made
from it (X.509 certificates in libnbd's directory layout, or a pre-shared key in psktool's
``username:hexkey`` format) and the handshake after NBD_OPT_STARTTLS.

Settings, as libnbd reads them (``nbd_set_tls*``, ``nbds://`` URIs)::

    mode           TLS_DISABLE (0), TLS_ALLOW (1: TLS if the server agrees) or TLS_REQUIRE (2)
    certificates   a directory: ca-cert.pem (the CA to trust), client-cert.pem and
                   client-key.pem (the client's own, if the server asks), ca-crl.pem.
                   None: $HOME/.pki/libnbd, $HOME/.config/pki/libnbd (/etc/pki/libnbd for
                   root) if one exists, else the system's trusted CAs
    verify_peer    check the server's certificate (default True)
    username       the PSK identity (default: the login name)
    psk_file       use TLS-PSK with the key of ``username`` in this file (Python >= 3.13)
    hostname       the name the server's certificate must carry (default: the TCP host;
                   over Unix and vsock sockets none: the chain alone is checked)

Every failure is a :class:`TLSError` with one line saying what went wrong (the server's
certificate expired, is not for that host name, is signed by an unknown CA, the PSK was
refused...).

:class:`pynbd.client.tls_stream.TlsStream` is the engine's stream over the SSL socket (a
module of its own: the blocking connection needs neither it nor asyncio).
"""

from __future__ import annotations

import errno as _errno
import os
import ssl
import sys

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    import socket
    from collections.abc import Awaitable, Callable
    from typing import Any

from pynbd.errors import NBDError

__all__ = ["TLS_ALLOW", "TLS_DISABLE", "TLS_REQUIRE", "Peer", "TLSConfig", "TLSError", "TLSRefused",
           "blocking_handshake", "context_for", "handshake", "read_psk", "wrap"]

TLS_DISABLE, TLS_ALLOW, TLS_REQUIRE = 0, 1, 2
_POLLIN, _POLLOUT = 1, 4


class TLSError(NBDError):
    """TLS could not be set up or the handshake failed. ``errno`` as libnbd sets it (0 for
    a failed handshake, as GnuTLS errors have none); ``libnbd_text`` the message without
    the errno's text, which libnbd appends itself."""

    def __init__(self, message: str, errno: int = 0, libnbd_text: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.libnbd_text = libnbd_text or message


class TLSRefused(TLSError):
    """The server does not do TLS and the client requires it (ENOTSUP, as libnbd)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, _errno.ENOTSUP)


class TLSConfig:
    """What a connection asks of TLS (see the module's documentation)."""

    __slots__ = ("certificates", "hostname", "mode", "psk_file", "username", "verify_peer")

    def __init__(self, mode: int = TLS_REQUIRE, certificates: str | None = None,
                 verify_peer: bool = True, username: str | None = None,
                 psk_file: str | None = None, hostname: str | None = None) -> None:
        self.mode = mode
        self.certificates = certificates
        self.verify_peer = verify_peer
        self.username = username
        self.psk_file = psk_file
        self.hostname = hostname

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"TLSConfig({fields})"

    @classmethod
    def from_uri(cls, u: dict[str, Any]) -> TLSConfig | None:
        """The TLS an ``nbds*://`` URI asks for (None for ``nbd*://``): its user name is the
        PSK identity, ``tls-certificates=``, ``tls-psk-file=``, ``tls-verify-peer=`` and
        ``tls-hostname=`` its settings."""
        if not u["tls"]:
            return None
        verify = u.get("tls_verify_peer")
        return cls(TLS_REQUIRE, u.get("tls_certificates"), True if verify is None else verify,
                   u.get("user"), u.get("tls_psk_file"), u.get("tls_hostname"))


# ---- the SSL context -------------------------------------------------------------------------
def _login_name() -> str:
    try:
        return os.getlogin()
    except OSError as e:
        num = e.errno or _errno.ENXIO
        raise TLSError("TLS-PSK: no user name (give one: nbds://USER@...): getlogin_r: "
                       f"{os.strerror(num)}", num, "getlogin_r") from None


def read_psk(path: str, username: str) -> bytes:
    """The key of ``username`` in a psktool file (``username:hexkey`` lines)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TLSError(f"open: {path}: {e.strerror}", e.errno or _errno.EIO,
                       f"open: {path}") from None
    for line in lines:
        user, sep, key = line.partition(":")
        if sep and user == username:
            try:
                return bytes.fromhex(key.strip())
            except ValueError:
                raise TLSError(f"{path}: the key of {username} is not hexadecimal",
                               _errno.EINVAL) from None
    raise TLSError(f"{path}: username {username} was not found in PSK file", _errno.EINVAL)


def _default_certificates() -> str | None:
    if os.geteuid() == 0:
        dirs = ["/etc/pki/libnbd"]
    else:
        home = os.path.expanduser("~")
        dirs = [os.path.join(home, ".pki", "libnbd"), os.path.join(home, ".config", "pki",
                                                                   "libnbd")]
    return next((d for d in dirs if os.path.isdir(d)), None)


def _load_x509(ctx: ssl.SSLContext, certs: str | None, explicit: bool) -> None:
    if certs is not None and not os.path.isdir(certs):
        e = _errno.ENOTDIR if os.path.exists(certs) else _errno.ENOENT
        raise TLSError(f"tls-certificates: {certs}: {os.strerror(e)}", e,
                       f"tls-certificates: {certs}")

    def path(name: str) -> str | None:
        p = os.path.join(certs, name) if certs else None
        return p if p and os.path.exists(p) else None

    ca, crl = path("ca-cert.pem"), path("ca-crl.pem")
    cert, key = path("client-cert.pem"), path("client-key.pem")
    try:
        if ca:
            ctx.load_verify_locations(ca)
        else:
            if explicit:
                raise TLSError(f"tls-certificates: {certs}: no ca-cert.pem in this directory",
                               _errno.ENOENT)
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if crl:
            ctx.load_verify_locations(crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if cert and key:
            ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise TLSError(f"tls-certificates: {certs}: cannot load: {e.reason or e}",
                       _errno.EINVAL) from None


def context_for(cfg: TLSConfig, host: str | None
                ) -> tuple[ssl.SSLContext, str | None, str | None]:
    """The SSL context for ``cfg``, the server name to send and check (``host`` is the
    TCP host connected to, None over Unix and vsock sockets) and the PSK user name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    name = cfg.hostname or host
    if cfg.psk_file is not None:
        user = cfg.username or _login_name()
        key = read_psk(cfg.psk_file, user)  # first, as libnbd reads it
        if not hasattr(ctx, "set_psk_client_callback"):
            v = sys.version_info
            raise TLSError("TLS-PSK (tls-psk-file) needs Python 3.13 or later; this is "
                           f"Python {v.major}.{v.minor}.{v.micro}", _errno.ENOTSUP)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the key authenticates the server
        ctx.set_ciphers("PSK:ECDHEPSK:DHEPSK:@SECLEVEL=0")
        ctx.set_psk_client_callback(lambda _hint: (user, key))
        return ctx, None, user
    _load_x509(ctx, cfg.certificates or _default_certificates(), cfg.certificates is not None)
    if not cfg.verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif not name:
        ctx.check_hostname = False  # no name to check: the chain is checked
    return ctx, name, None


# ---- the handshake ---------------------------------------------------------------------------
_VERIFY_WORDS = {
    10: "the server's certificate has expired",
    9: "the server's certificate is not yet valid",
    18: "the server's certificate is self-signed and not trusted",
    19: "the server's certificate chain has a CA that is not trusted",
    20: "the server's certificate is not signed by a trusted CA",
    21: "the server's certificate is not signed by a trusted CA",
    23: "the server's certificate was revoked",
}


class Peer:
    """What the handshake must establish: the server's name (checked in its certificate)
    or, with a PSK, the user whose key it must know."""

    __slots__ = ("name", "psk_user")

    def __init__(self, name: str | None, psk_user: str | None) -> None:
        self.name = name
        self.psk_user = psk_user


def check_session(ssock: ssl.SSLSocket, peer: Peer) -> None:
    """After the handshake: with a PSK, the server must have used it (a server that showed a
    certificate instead proved nothing, as the client does not check certificates then)."""
    if peer.psk_user is not None and ssock.getpeercert(binary_form=True) is not None:
        raise TLSError("TLS handshake: the server did not use the pre-shared key (it "
                       "presented a certificate instead)")


def handshake_failure(e: BaseException, peer: Peer) -> TLSError:
    """One line for a failed handshake."""
    name = peer.name
    if peer.psk_user is not None and isinstance(
            e, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, EOFError)):
        return TLSError(f"TLS handshake: the server refused the pre-shared key of "
                        f"{peer.psk_user} (it closed the connection)")
    if isinstance(e, ssl.SSLCertVerificationError):
        code = getattr(e, "verify_code", 0)
        if code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH / IP_ADDRESS_MISMATCH (64)
            what = f"the server's certificate is not for {name}"
        elif code == 64:
            what = f"the server's certificate is not for the address {name}"
        else:
            what = _VERIFY_WORDS.get(code, "") or "the server's certificate was not accepted"
        return TLSError(f"TLS handshake: certificate verification failed: {what} "
                        f"({getattr(e, 'verify_message', '') or e.reason})")
    if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, EOFError)):
        return TLSError("TLS handshake: the server closed the connection (it did not accept "
                        "this client: does it want a client certificate, or a PSK?)")
    if isinstance(e, ssl.SSLError):
        reason = (e.reason or str(e)).lower().replace("_", " ")
        if "decrypt" in reason or "bad record mac" in reason or "psk" in reason:
            return TLSError(f"TLS handshake: the pre-shared key was refused ({reason})")
        if "certificate required" in reason:
            return TLSError("TLS handshake: the server requires a client certificate "
                            "(client-cert.pem and client-key.pem in tls-certificates)")
        return TLSError(f"TLS handshake: {reason}")
    return TLSError(f"TLS handshake: {e}")


async def handshake(ssock: ssl.SSLSocket, wait: Callable[[int, int], Awaitable[Any]],
                    peer: Peer) -> None:
    """Run the TLS handshake on a non-blocking SSL socket; ``wait(fd, events)`` waits for
    the descriptor (POLLIN 1, POLLOUT 4)."""
    fd = ssock.fileno()
    while True:
        try:
            ssock.do_handshake()
            break
        except ssl.SSLWantReadError:
            await wait(fd, _POLLIN)
        except ssl.SSLWantWriteError:
            await wait(fd, _POLLOUT)
        except (ssl.SSLError, OSError) as e:
            raise handshake_failure(e, peer) from None
    check_session(ssock, peer)


def blocking_handshake(ssock: ssl.SSLSocket, peer: Peer) -> None:
    """The handshake on a blocking SSL socket."""
    try:
        ssock.do_handshake()
    except (ssl.SSLError, OSError) as e:
        raise handshake_failure(e, peer) from None
    check_session(ssock, peer)


def wrap(sock: socket.socket, cfg: TLSConfig, host: str | None) -> tuple[ssl.SSLSocket, Peer]:
    """``sock`` as an SSL socket (the handshake not yet made) and what the handshake must
    establish."""
    ctx, name, user = context_for(cfg, host)
    try:
        return ctx.wrap_socket(sock, server_hostname=name or None,
                               do_handshake_on_connect=False), Peer(name, user)
    except ValueError as e:
        raise TLSError(f"tls-hostname: {e}", _errno.EINVAL) from None
