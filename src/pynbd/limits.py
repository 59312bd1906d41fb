"""Every limit pynbd enforces, each with the reason for its value.

docs/limits.md lists the same table for users.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_THREADS",
    "DF_MAX",
    "HANDSHAKE_TIMEOUT",
    "MAX_BYTES_IN_FLIGHT",
    "MAX_CONNECTIONS",
    "MAX_EXPORT_SIZE",
    "MAX_EXTENTS_PER_REPLY",
    "MAX_META_QUERIES",
    "MAX_OPTION_LENGTH",
    "MAX_OPTION_ROUNDS",
    "MAX_OPTION_ROUNDS_PER_EXPORT",
    "MAX_PAYLOAD_ACCEPTED",
    "MAX_PAYLOAD_ADVERTISED",
    "MAX_REQUESTS_IN_FLIGHT",
    "MAX_SERVER_BYTES_IN_FLIGHT",
    "MAX_STRING",
]

#: Option requests per connection before the server hangs up (nbdkit's MAX_NR_OPTIONS):
#: a well-behaved client needs a handful; an endless stream is a denial of service.
MAX_OPTION_ROUNDS = 32
#: Extra option rounds granted per export the server lists (nbdkit: 32 + 32 per export),
#: so a client may INFO every listed export.
MAX_OPTION_ROUNDS_PER_EXPORT = 32
#: Largest option payload read into memory; more is a hard disconnect (nbdkit: 64 MiB).
#: The biggest legitimate option is a META_CONTEXT request with many queries.
MAX_OPTION_LENGTH = 64 * 1024 * 1024
#: Longest string (export name, description, context name) the spec allows (MUST be <= 4096).
MAX_STRING = 4096
#: Meta context queries in one option; more gets ERR_TOO_BIG (the spec asks for a bound).
MAX_META_QUERIES = 1024
#: Maximum payload advertised in INFO_BLOCK_SIZE: the spec's default that every client honours.
MAX_PAYLOAD_ADVERTISED = 32 * 1024 * 1024
#: Largest READ/WRITE accepted: twice the advertised maximum, like nbdkit, for clients that
#: ignore the advertisement. A WRITE beyond it is a hard disconnect (its payload would be a DoS).
MAX_PAYLOAD_ACCEPTED = 64 * 1024 * 1024
#: Requests in flight per connection before the server stops reading (back pressure).
MAX_REQUESTS_IN_FLIGHT = 1024
#: Bytes one connection may hold before the server stops reading its requests until the
#: client catches up: replies queued but not yet sent, READs and WRITE payloads in worker
#: threads, a large WRITE payload being received. At least what a client keeps in flight
#: (pynbd's client: 64 MiB; nbdcopy: 64 requests of 256 KiB), so only a client that does not
#: read its replies ever waits; no request fails for it.
MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024
#: The same for all connections together: 1024 connections at 64 MiB each would be 64 GiB.
#: Past it every connection that wants more waits until some client reads its replies.
MAX_SERVER_BYTES_IN_FLIGHT = 1024 * 1024 * 1024
#: Seconds a client may take to finish the handshake (nbdkit's --timeout, off by default there);
#: a half-open connection otherwise holds a slot forever.
HANDSHAKE_TIMEOUT = 60.0
#: Simultaneous client connections per server; more are accepted and closed at once.
MAX_CONNECTIONS = 1024
#: Extents in one block-status chunk (the spec's SHOULD: at most 2^20 descriptors).
MAX_EXTENTS_PER_REPLY = 1 << 20
#: Largest export size (nbdkit asserts it; libnbd < 1.16.5 mishandled more, CVE-2023-5215).
MAX_EXPORT_SIZE = (1 << 63) - 1
#: DF reads up to this size must be served in one chunk (the spec: 64 KiB).
DF_MAX = 64 * 1024
#: Requests in flight in worker threads per connection for blocking plugins (nbdkit's -t default).
DEFAULT_THREADS = 16
