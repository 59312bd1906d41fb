"""NBD URIs: parse and build ``nbd://``, ``nbds://``, ``nbd+unix://`` ... (sans-IO).

Follows the NBD project's ``doc/uri.md`` plus libnbd's extensions (``+vsock`` schemes,
``tls-certificates=`` / ``tls-psk-file=``)::

    nbd-uri = scheme "://" [ [userinfo "@"] host [":" port] ] [ "/" export ] [ "?" query ]

- Schemes (case-insensitive): ``nbd``, ``nbds``, ``nbd+unix``, ``nbds+unix``, ``nbd+vsock``,
  ``nbds+vsock``; the ``scheme://`` form is required (as libnbd).
- TCP: no host means ``localhost``; IPv6 literals go in ``[...]``; the port defaults to 10809.
- ``+unix``: ``socket=PATH`` is required, the authority may only carry ``user@``; an abstract
  socket is written ``socket=%00name`` and decodes to ``"\\0name"``.
- ``+vsock``: the host is a numeric CID (default 2, the hypervisor host).
- Export name: the percent-decoded path after its first ``/`` (``nbd://h//disk`` -> ``/disk``).
- Query: ``name=value`` pairs joined by ``&``, percent-decoded (``+`` is a literal plus).
  Known: ``socket``, ``tls-type``, ``tls-hostname``, ``tls-verify-peer``, ``tls-certificates``,
  ``tls-psk-file``. ``x-*`` names are accepted silently; other names are kept and listed in
  :attr:`NBDURI.warnings` (the spec says they SHOULD be diagnosed). Duplicates are an error.

Every problem raises :class:`URIError` (a :class:`ValueError` and a
:class:`~pynbd.errors.ConfigError`) with a message meant for the user.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field, fields

from pynbd.protocol._uriparse import (
    DEFAULT_PORT,
    KNOWN_PARAMS,
    SCHEMES,
    URIError,
    checked,
    param_value,
    split,
)

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "DEFAULT_PORT", "KNOWN_PARAMS", "NBDURI", "SCHEMES", "URIError", "format_uri", "make_uri",
    "parse_uri",
]

# What format_uri leaves unescaped: libxml2's xmlSaveUri sets (what nbd_get_uri produces).
_PATH_SAFE = "/!*'();@&=+$,"
_USER_SAFE = "!*'();:&=+$,"
_HOST_SAFE = "!$&'()*+,;="


# ---- the value --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NBDURI:
    """A parsed NBD URI.

    ``scheme`` is derived from ``tls`` and ``transport``. ``query`` holds every query
    parameter (decoded); the typed ``socket`` / ``tls_*`` fields are authoritative and
    ``query`` is kept in step with them (a typed field left at ``None`` drops its key).
    ``warnings`` lists query parameter names this parser does not understand.
    """

    scheme: str = field(init=False, default="")
    tls: bool = False
    transport: str = "tcp"
    host: str | None = None
    port: int = DEFAULT_PORT
    export: str = ""
    socket: str | None = None
    user: str | None = None
    tls_certificates: str | None = None
    tls_psk_file: str | None = None
    tls_hostname: str | None = None
    tls_verify_peer: bool | None = None
    tls_type: str | None = None
    query: dict[str, str] = field(default_factory=dict, hash=False)
    warnings: tuple[str, ...] = field(init=False, default=(), compare=False, hash=False)

    def __post_init__(self) -> None:
        f = checked({a.name: getattr(self, a.name) for a in fields(self) if a.init})
        for name in ("scheme", "host", "query", "warnings"):
            object.__setattr__(self, name, f[name])

    @property
    def vsock_cid(self) -> int:
        """The vsock CID (``int(host)``); only for ``+vsock`` URIs."""
        if self.transport != "vsock":
            raise URIError(f"{self.scheme} URI has no vsock CID")
        assert self.host is not None
        return int(self.host)

    @property
    def is_abstract(self) -> bool:
        """True for a Unix socket in the abstract namespace (``socket=%00name``)."""
        return self.socket is not None and self.socket.startswith("\0")

    def __str__(self) -> str:
        return format_uri(self)


def parse_uri(text: str) -> NBDURI:
    """Parse an NBD URI; raise :class:`URIError` naming the problem."""
    return NBDURI(**split(text))


# ---- building ---------------------------------------------------------------------------


def format_uri(u: NBDURI, *, always_port: bool = False) -> str:
    """Build the URI text for ``u``, in the forms libnbd's ``nbd_get_uri`` emits.

    ``nbd[s]://[user@]host[:port]/export[?params]``,
    ``nbd[s]+unix://[user@]/export?socket=PATH[&params]``,
    ``nbd[s]+vsock://[user@]CID[:port]/export[?params]``.
    The path always starts with ``/`` (``nbd://h/``, ``nbd+unix:///?socket=...``). The port
    is omitted when it is 10809 unless ``always_port`` (libnbd always spells it out).
    """
    out = [u.scheme, "://"]
    if u.user is not None:
        out += [urllib.parse.quote(u.user, safe=_USER_SAFE), "@"]
    if u.transport == "tcp":
        host = u.host or "localhost"
        if ":" in host:
            addr, pct, zone = host.partition("%")
            zone = "%25" + urllib.parse.quote(zone, safe="") if pct else ""
            out += ["[", addr, zone, "]"]
        else:
            out.append(urllib.parse.quote(host, safe=_HOST_SAFE))
    elif u.transport == "vsock":
        out.append(u.host or "2")
    if u.transport != "unix" and (always_port or u.port != DEFAULT_PORT):
        out.append(f":{u.port}")
    out += ["/", urllib.parse.quote(u.export, safe=_PATH_SAFE)]
    if u.query:
        out.append("?")
        out.append("&".join(
            urllib.parse.quote(k, safe="")
            + "=" + urllib.parse.quote(v, safe="/", errors="surrogateescape")
            for k, v in u.query.items()))
    return "".join(out)


def make_uri(*, tls: bool = False, transport: str = "tcp", host: str | None = None,
             port: int = DEFAULT_PORT, export: str = "", socket: str | None = None,
             user: str | None = None, **params: str | bool) -> str:
    """Build an NBD URI from parts, e.g. ``make_uri(transport="unix", socket="/s")``.

    ``params`` are query parameters; ``_`` in a keyword becomes ``-``
    (``tls_psk_file="/k"`` -> ``tls-psk-file=/k``, ``x_foo="1"`` -> ``x-foo=1``);
    ``tls_verify_peer`` takes a bool.
    """
    typed: dict[str, Any] = {}
    query: dict[str, str] = {}
    for key, value in params.items():
        name = key.replace("_", "-")
        if name in KNOWN_PARAMS:
            if isinstance(value, str) and name in ("tls-type", "tls-verify-peer"):
                value = param_value(name, value)
            typed[KNOWN_PARAMS[name]] = value
        else:
            if not isinstance(value, str):
                raise URIError(f"{name}= parameter must be a str, not {type(value).__name__}")
            query[name] = value
    return format_uri(NBDURI(tls=tls, transport=transport, host=host, port=port, export=export,
                             socket=socket, user=user, query=query, **typed))
