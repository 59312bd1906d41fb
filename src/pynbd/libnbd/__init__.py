"""libnbd's Python API (``import nbd``) on top of pynbd's asyncio client engine.

``import pynbd.libnbd as nbd`` and programs written for libnbd's Python bindings (Debian's
python3-libnbd 1.14.2) run unchanged: the same ``nbd.NBD`` methods with the same signatures,
constants, ``nbd.Buffer``, ``nbd.Error`` (``"nbd_pread: request out of bounds: Invalid
argument (EINVAL)"``), cookies, ``poll`` and completion-callback rules. Failures read as
libnbd's: NBD URIs are parsed as libnbd does (libxml2's RFC 3986 parser, then lib/uri.c's
checks, in its order and words), connections that fail name getaddrinfo() or connect(2)
as libnbd does, a subprocess server that cannot be run prints the child's line on stderr,
and option mode stays in negotiation with a plain newstyle server (``opt_go()`` sends
NBD_OPT_EXPORT_NAME; ``opt_list``/``opt_info`` fail with ENOTSUP). The calls libnbd 1.16
added that need no new protocol work are here too: ``close()``, ``nbd.ClosedHandle``,
``nbd.nbd()``, ``stats_*``, ``SIZE_PAYLOAD``, ``STRICT_PAYLOAD``, ``supports_vsock()``.

How it works
------------
There is one implementation of every operation: the client engine
(:class:`pynbd.client.engine.AsyncClient`, its negotiation, its reply decoder and its strict
checks), which a handle runs in the caller's thread, as libnbd runs its state machine: no
thread, no event loop, no thread crossing per command (:mod:`pynbd.libnbd.driver`). A call
makes progress only inside itself: an aio call checks its arguments, takes a cookie and
queues its request; ``poll()``, ``aio_notify_read()``/``aio_notify_write()`` and the
blocking calls write what is queued, wait for the socket with ``poll(2)`` and process what
arrived. A synchronous call is its aio call plus that wait, as in libnbd (``lib/rw.c``).
Everything the program sees runs there, in its thread: a read's chunk callback as each chunk
arrives, a block status's extent callback and then the completion callback when the reply is
complete, the move to the "done" list, auto-retirement.

``aio_get_fd()`` returns the connection's socket and ``aio_get_direction()`` what it waits
for (READ, WRITE or both), so programs driving the handle from their own ``select``/``poll``
loop with ``aio_notify_read()``/``aio_notify_write()`` work as with libnbd.

Each handle has a lock held for the whole of every call, as libnbd: calls from several
threads on one handle run one at a time; callbacks run with the lock held.

The package's modules say what they hold: :mod:`~pynbd.libnbd.handle` (``NBD``: progress,
state, closing), :mod:`~pynbd.libnbd.settings`, :mod:`~pynbd.libnbd.connect`,
:mod:`~pynbd.libnbd.options`, :mod:`~pynbd.libnbd.commands` (its calls),
:mod:`~pynbd.libnbd.constants`, :mod:`~pynbd.libnbd.errors`, :mod:`~pynbd.libnbd.buffers`,
:mod:`~pynbd.libnbd.callbacks`, :mod:`~pynbd.libnbd.states`, :mod:`~pynbd.libnbd.calls`
(how every call is made), :mod:`~pynbd.libnbd.engine` and :mod:`~pynbd.libnbd.driver`.

Differences from libnbd (and why)
---------------------------------
- TLS is Python's ssl module (OpenSSL), not GnuTLS: a failed handshake names what failed
  (an expired certificate, an unknown CA, the wrong host name, a refused pre-shared key)
  where libnbd passes GnuTLS's message on; errno is 0 for both. PSK needs Python >= 3.13
  (``SSLContext.set_psk_client_callback``); before, a PSK connection fails with ENOTSUP
  saying so.
- The server's certificate is always checked (unless ``set_tls_verify_peer(False)``): over
  Unix and vsock sockets the chain (and the name given by ``set_tls_hostname``), and
  without a certificates directory against the system's CAs. libnbd 1.14 checks nothing
  over a Unix socket, nor over TCP when no certificates directory is found.
- A ``tls-certificates`` directory that does not exist, or has no ``ca-cert.pem``, is an
  error (libnbd 1.14 goes on without it).
- ``tls-verify-peer=`` and ``tls-hostname=`` in URIs and ``set_tls_hostname``/
  ``get_tls_hostname`` are later libnbd's (1.14 ignores those URI parameters).
- Strict mode defaults to 1.14's ``STRICT_MASK`` (0x1f); ``STRICT_PAYLOAD`` (1.16) is
  accepted by ``set_strict_mode`` but off by default.
- ``connection_state()`` reports the public states only (START, CONNECT.START, NEGOTIATING,
  READY, CLOSED, DEAD), never libnbd's internal sub-states; ``aio_is_processing()`` is False.
- Debug output is libnbd's per-call ``enter:``/``leave:`` trace (same format); the engine's
  internal state-machine messages do not exist.
- ``get_uri()`` after ``connect_systemd_socket_activation`` raises EINVAL (the engine removes
  its temporary socket once connected, so there is nothing to reconnect to).
- ``stats_*`` count protocol bytes, option replies, simple replies and structured chunks.
- ``nbd.Buffer(n)`` is zero-filled, not uninitialised (Python cannot allocate otherwise); the
  ``_o``/``_init`` bookkeeping is libnbd's.
- ``close()`` (and garbage collection, and exit) is polite: commands still in flight may
  finish (for up to 10 s, their callbacks are not called) and NBD_CMD_DISC is sent; libnbd
  just hangs up.
- An export size of 2^63 or more is refused while connecting (EOVERFLOW); libnbd >= 1.16.5
  refuses it in ``get_size()`` instead (CVE-2023-5215; 1.14 has no check).
- ``connect_systemd_socket_activation`` keeps its end of the listening socket open until it
  is connected, so a server that cannot be run or exits at once always resets the
  connection ("recv: Connection reset by peer"); libnbd closes it first and, when the
  server is already gone, rarely reports "connect: Connection refused" instead. The server
  is started through ``/bin/sh -c 'exec ...'`` (LISTEN_PID is still the server's pid).
- An aio connect runs getaddrinfo() and connect(2) in the call, as libnbd (their failures
  fail the call); the rest of an aio connect or option makes progress in the calls that
  follow: until it is done ``connection_state()`` reads CONNECT.START.
- The type of a raised error is ``pynbd.libnbd.Error`` (libnbd: ``nbd.Error``).
"""

from __future__ import annotations

import atexit
import contextlib
from collections.abc import Iterator

from pynbd.libnbd import constants
from pynbd.libnbd.buffers import Buffer
from pynbd.libnbd.constants import *
from pynbd.libnbd.errors import ClosedHandle, Error
from pynbd.libnbd.handle import NBD, close_all

__all__ = [
    "NBD",
    "Buffer",
    "ClosedHandle",
    "Error",
    "__version__",
    "nbd",
    "package_name",
]
__all__ += constants.__all__  # libnbd's constants

# The names a program sees are the package's (``pynbd.libnbd.Error``), as libnbd's are nbd's.
for _cls in (NBD, Buffer, Error, ClosedHandle):
    _cls.__module__ = __name__


@contextlib.contextmanager
def nbd() -> Iterator[NBD]:
    """A new handle, closed when the ``with`` block ends (libnbd 1.16)."""
    h = NBD()
    try:
        yield h
    finally:
        if not h._gone:
            h.close()


atexit.register(close_all)

# As in libnbd, importing the module creates two handles (nbd1, nbd2): the first handle a
# program creates is nbd3.
package_name = NBD().get_package_name()
__version__ = NBD().get_version()
