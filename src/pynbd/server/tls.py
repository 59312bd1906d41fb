"""TLS for the server: the SSL context built from ``--tls*`` and the stream that runs a
connection over TLS after NBD_OPT_STARTTLS.

Certificates (X.509) are read from a directory in the layout nbdkit and qemu use:
``ca-cert.pem`` (the CA clients' certificates are checked against with
``--tls-verify-peer``), ``server-cert.pem``, ``server-key.pem`` and, optionally,
``ca-crl.pem``. Without ``--tls-certificates`` the directories nbdkit looks in are tried:
``$HOME/.pki/nbdkit/`` (not for root), then ``/etc/pki/nbdkit/``. Pre-shared keys
(``--tls-psk=FILE``, psktool's ``username:hexkey`` lines) need Python 3.13's PSK
callbacks; the file is read again on each handshake, as nbdkit does.

:class:`TlsStream` is an :class:`~pynbd.stream.FdStream` whose bytes pass through an
:class:`ssl.SSLObject` over memory BIOs: reads fill the caller's buffer straight from the
decrypted record, asking OpenSSL only for records that are whole in its BIO (the stream
follows the record headers of the ciphertext it feeds), writes coalesce small buffers into
full records and encrypt large ones in one call, and the ciphertext of a whole batch leaves
in one ``writev`` through the plain stream's queue. Plain connections never touch this
module.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Any

from pynbd.errors import ConfigError
from pynbd.stream import FdStream

__all__ = ["TLS_PSK_PYTHON", "TlsStream", "certificate_dirs", "make_context", "start_tls"]

log = logging.getLogger("pynbd.server")

#: Python version whose ssl module has PSK callbacks (SSLContext.set_psk_server_callback).
TLS_PSK_PYTHON = (3, 13)
#: Plaintext gathered into one record before encrypting: TLS's largest record, so small
#: replies share records and large payloads are cut by OpenSSL itself.
RECORD = 16384
#: Ciphertext read from the socket at once (many records per system call).
RAW_READ = 256 * 1024
#: nbdkit's default certificate directory for root (and the fallback for other users).
ROOT_CERTIFICATES_DIR = "/etc/pki/nbdkit"

_NO_CERTS = ("--tls={mode} but could not load TLS certificates from {dirs} (give "
             "--tls-certificates=DIR holding ca-cert.pem, server-cert.pem and server-key.pem)")


#: OpenSSL's reasons, in words (GnuTLS's, which nbdkit prints).
_REASONS = {
    "KEY_VALUES_MISMATCH": "the certificate and the given key do not match",
    "NO_START_LINE": "not a PEM file",
    "PEM_LIB": "not a PEM file",
    "BAD_END_LINE": "a truncated PEM file",
}


def _no_passphrase() -> bytes:
    # Never a prompt on the terminal (OpenSSL's default for an encrypted key), as nbdkit.
    raise ConfigError("server-key.pem is encrypted: give the key without a passphrase")


def certificate_dirs(given: str | None) -> list[Path]:
    """The directories to look for certificates in, in order (nbdkit's defaults)."""
    if given is not None:
        return [Path(given)]
    dirs = []
    home = os.environ.get("HOME")
    if os.geteuid() != 0 and home:
        dirs.append(Path(home) / ".pki" / "nbdkit")
    dirs.append(Path(ROOT_CERTIFICATES_DIR))
    return dirs


def _load_x509(ctx: ssl.SSLContext, d: Path, verify_peer: bool) -> bool:
    """Load the directory's server certificate and key (and the CA and CRL to check
    clients with); False when the directory lacks them."""
    cert, key, ca, crl = (d / n for n in ("server-cert.pem", "server-key.pem",
                                          "ca-cert.pem", "ca-crl.pem"))
    if not (cert.is_file() and key.is_file() and ca.is_file()):
        return False
    try:
        try:
            ctx.load_cert_chain(cert, key, password=_no_passphrase)
        except ssl.SSLError as e:
            why = _REASONS.get(e.reason or "") or (
                "not a PEM file" if "PEM" in str(e) else e.reason or str(e))
            raise ConfigError(f"{d}: loading server certificate and key ({cert.name}, "
                              f"{key.name}): {why}") from None
        if verify_peer:
            ctx.load_verify_locations(cafile=str(ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
            if crl.is_file():
                ctx.load_verify_locations(cafile=str(crl))
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"{d}: cannot load TLS certificates: "
                          f"{getattr(e, 'reason', None) or e.strerror or e}") from None
    log.debug("TLS: loaded certificates from %s", d)
    return True


def read_psk(path: str, identity: str) -> bytes | None:
    """The key of ``identity`` in a psktool file (``username:hexkey`` lines), or None."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        log.error("TLS: %s: %s", path, e.strerror or e)
        return None
    for line in text.splitlines():
        user, sep, key = line.strip().partition(":")
        if sep and user == identity:
            try:
                return bytes.fromhex(key)
            except ValueError:
                log.error("TLS: %s: the key of user %r is not hexadecimal", path, user)
                return None
    log.error("TLS: %s: unknown PSK username %r", path, identity)
    return None


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _psk_context(path: str) -> ssl.SSLContext:
    resolved = os.path.realpath(path)
    if not os.path.exists(resolved):
        raise ConfigError(f"{path}: No such file or directory")
    if sys.version_info < TLS_PSK_PYTHON:
        raise ConfigError("--tls-psk: pre-shared keys need Python 3.13 or later "
                          f"(this is Python {sys.version.split()[0]})")
    ctx = _base_context()
    ctx.set_ciphers("PSK")  # TLS 1.2's PSK suites; TLS 1.3 uses its own suites
    ctx.set_psk_server_callback(  # type: ignore[attr-defined]
        lambda identity: read_psk(resolved, identity or "") or b"")
    return ctx


def make_context(mode: str, certificates: str | None, verify_peer: bool,
                 psk: str | None) -> ssl.SSLContext | None:
    """The server's SSL context for ``--tls=MODE`` (None when TLS is off or, with
    ``--tls=on``, when no certificates are found: then TLS is refused, as nbdkit does)."""
    if mode == "off":
        return None
    if psk is not None:
        return _psk_context(psk)
    ctx = _base_context()
    dirs = certificate_dirs(certificates)
    for d in dirs:
        if _load_x509(ctx, d, verify_peer):
            return ctx
    msg = _NO_CERTS.format(mode=mode, dirs=" or ".join(str(d) for d in dirs))
    if mode == "require":
        raise ConfigError(msg)
    log.warning("%s: TLS is disabled and TLS connections will be rejected", msg)
    return None


class TlsStream(FdStream):
    """A connection's stream after STARTTLS: the same interface, TLS on the wire."""

    #: Most bytes the transmission phase reads at once: several large requests decrypted
    #: in one call, their replies encrypted together.
    read_window = 1024 * 1024

    def __init__(self, plain: FdStream, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        budget = plain.budget
        owner = plain.detach()
        super().__init__(plain.loop, plain.rfd, plain.wfd, owner, plain.peer)
        self.budget = budget
        self.ssl = obj
        # the C methods themselves: one Python call less per 16 KiB record
        sslobj: Any = getattr(obj, "_sslobj", obj)
        self._read = sslobj.read
        self._write = sslobj.write
        self._in = incoming
        self._out = outgoing
        self._pending = sslobj.pending
        self._raw = bytearray(RAW_READ)
        self._rawview = memoryview(self._raw)
        self._acc = bytearray()
        #: The last read found no whole record and the descriptor empty: wait for it.
        self._starved = False
        self._paused = False
        self._user_reader: Any = None
        self._eof = False
        # The records' framing, in offsets of the ciphertext fed to the engine: bytes fed,
        # where the next record starts (the end of the last whole one: ``_whole``), and
        # the first bytes of a record header cut by a read. OpenSSL takes records from the
        # memory BIO whole (header, then body), so a record is whole at the BIO's head
        # while ``_fed - pending < _whole``: no read that can only raise SSLWantReadError
        # (one per read of the descriptor that ends inside a record: ~40,000 per GiB from
        # a client that sends record by record). None: framing lost, read and see.
        self._fed = 0
        self._next: int | None = 0
        self._whole = 0
        self._part = b""
        rest = incoming.read()  # what came with the client's Finished
        if rest:
            self._feed(memoryview(rest), len(rest))

    # ---- reading -----------------------------------------------------------------------
    def _fill(self) -> None:
        """Move ciphertext from the descriptor into the TLS engine (BlockingIOError when
        there is none)."""
        if self._eof:
            return
        try:
            n = os.readv(self.rfd, [self._rawview])
        except BlockingIOError:
            self._starved = True
            raise
        if n == 0:
            self._eof = True
            self._in.write_eof()
        else:
            self._feed(self._rawview, n)
        self._starved = False

    def _feed(self, raw: memoryview, n: int) -> None:
        """Give ``raw[:n]`` to the engine and follow the record headers in it."""
        self._in.write(raw[:n])
        at = self._next
        if at is None:
            return
        fed = self._fed
        end = self._fed = fed + n
        whole = self._whole
        while at <= end:
            whole = at
            if at == end:  # the common case: reads end where records do
                self._part = b""
                break
            if at + 5 > end:  # the header is cut: keep its start
                self._part = (self._part if at < fed else b"") + bytes(raw[max(at - fed, 0):n])
                break
            if at >= fed:
                i = at - fed
                kind, size = raw[i], raw[i + 3] << 8 | raw[i + 4]
            else:
                head = self._part + bytes(raw[:at + 5 - fed])
                self._part = b""
                kind, size = head[0], head[3] << 8 | head[4]
            if not 20 <= kind <= 24:  # not a TLS record: stop guessing
                self._next = None
                return
            at += 5 + size
        self._whole = whole
        self._next = at

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` with as many records as are here (one call may cover many records
        and many requests: the batch the plain stream would get from one readv)."""
        # hot path: one pass per 16 KiB record, ~65,000 per GiB: benchmarks/tls.py
        read, bio = self._read, self._in
        want = len(view)
        got = 0
        while got < want:
            if self._next is None or self._fed - bio.pending < self._whole or \
                    self._eof or self._pending():
                try:
                    n: int = read(want - got, view[got:])
                except ssl.SSLWantReadError:
                    n = -1
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    break
                if n == 0:
                    break
                if n > 0:
                    got += n
                    continue
            # no whole record here (or OpenSSL wants more): more ciphertext first
            try:
                self._fill()
            except BlockingIOError:
                if got:
                    break
                raise
        if self._out.pending:
            self._send_records()
        return got

    def readinto2(self, first: memoryview, then: memoryview) -> int:
        n = self.readinto(first)
        if n == len(first) and len(then) and self.buffered:
            try:
                n += self.readinto(then)
            except BlockingIOError:
                pass
        return n

    @property
    def buffered(self) -> bool:
        """Whether bytes wait inside the TLS engine (the descriptor will not say so)."""
        return bool(self.ssl.pending() or (self._in.pending and not self._starved))

    async def read_some(self, n: int = 65536) -> bytes:
        buf = bytearray(n)
        while True:
            try:
                got = self.readinto(memoryview(buf))
                return bytes(buf[:got])
            except BlockingIOError:
                pass
            except ssl.SSLError as e:
                log.debug("TLS: read: %s", e)
                return b""
            raw = await super().read_some(RAW_READ)
            if not raw:
                self._in.write_eof()
                self._eof = True
            else:
                self._in.write(raw)
                self._starved = False

    def set_reader(self, cb: Any) -> None:
        self._user_reader = cb
        super().set_reader(self._on_readable if cb is not None else None)
        self._paused = False
        self._kick()

    def _on_readable(self) -> None:
        cb = self._user_reader
        if cb is not None:
            cb()
            self._kick()

    def _kick(self) -> None:
        """Call the reader again soon while decrypted or undecrypted bytes wait inside
        the engine: the descriptor is not readable for them."""
        if self._user_reader is not None and not self._paused and not self.closed and \
                self.loop is not None and self.buffered:
            self.loop.call_soon(self._again)

    def _again(self) -> None:
        if self._user_reader is not None and not self._paused and not self.closed and \
                self.buffered:
            self._on_readable()

    def pause_reading(self) -> None:
        self._paused = True
        super().pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        super().resume_reading()
        self._kick()

    # ---- writing -----------------------------------------------------------------------
    def write_joined(self, data: bytes, parts: int) -> None:
        """Encrypted, as :meth:`write` (never straight to the descriptor)."""
        self.write([data])

    def write(self, bufs: list[Any]) -> None:
        """Encrypt and queue, in full records: buffers below a record are gathered (one
        copy, which the cipher's own copy dwarfs); a large one fills the record at hand,
        its whole records are encrypted in one call and sent at once (a batch of many
        large replies would otherwise pass through memory twice more: out of the BIO, into
        the socket) and its tail starts the next record (a 256 KiB reply and its header
        take 16 records, not 17 with a 16-byte one, for the client to decrypt too)."""
        if self.closed or self.write_error is not None:
            return
        write, acc = self._write, self._acc
        try:
            for b in bufs:
                n = len(b) if type(b) is bytes else memoryview(b).nbytes
                if len(acc) + n < RECORD:
                    acc += b
                    continue
                view = memoryview(b).cast("B")
                if acc:
                    take = RECORD - len(acc)
                    acc += view[:take]
                    write(acc)
                    acc.clear()
                    view = view[take:]
                whole = len(view) - len(view) % RECORD
                if whole:
                    write(view[:whole])
                    # out at once, while the ciphertext is still in the cache
                    self._send_records()
                if whole < len(view):
                    acc += view[whole:]
            if acc:
                write(acc)
                acc.clear()
        except ssl.SSLError as e:
            acc.clear()
            self._fail(ConnectionResetError(f"TLS: {e}"))
            return
        self._send_records()

    def _send_records(self) -> None:
        data = self._out.read()
        if data:
            super().write([data])
            if self._writer_on:
                # The socket was full a moment ago; encrypting the batch's next replies
                # takes long enough for the client to drain it. Try now rather than when
                # the loop next looks: else the client idles while we encrypt.
                self._flush()

    # ---- closing -----------------------------------------------------------------------
    def close(self) -> None:
        """Send TLS's close_notify (best effort), then close as a plain stream."""
        if not self.closed and self.write_error is None:
            try:
                self.ssl.unwrap()
            except ssl.SSLError:
                pass
            data = self._out.read()
            if data:
                try:
                    os.write(self.wfd, data)
                except OSError:
                    pass
        super().close()


async def start_tls(plain: FdStream, ctx: ssl.SSLContext) -> TlsStream:
    """Run the TLS handshake (server side) over ``plain`` and return the stream to use
    from now on. Raises ConnectionError when the client leaves, ssl.SSLError when the
    handshake fails."""
    await plain.drain()  # the STARTTLS reply leaves in plain text first
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=True)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        finally:
            data = outgoing.read()
            if data:
                plain.write([data])
        raw = await plain.read_some(RAW_READ)
        if not raw:
            raise ConnectionError("the client closed the connection during the TLS handshake")
        incoming.write(raw)
    await plain.drain()
    return TlsStream(plain, obj, incoming, outgoing)
