"""THE NBD URI parser, with its two behaviours (:mod:`pynbd.protocol.uri` has the grammar,
the :class:`~pynbd.protocol.uri.NBDURI` value and formatting).

One grammar (RFC 3986's character classes, the scheme, the split of what follows the
authority into path, query and fragment) read two ways:

- :func:`split` — pynbd's rules: the NBD URI specification, strictly, with a message naming
  each problem (:class:`URIError`); what :func:`pynbd.protocol.uri.parse_uri` and the clients
  use;
- :func:`parse_libxml2` and :func:`libnbd_queries` — the rules libnbd 1.14 reads URIs by:
  libxml2 2.9's ``xmlParseURI`` (an absolute URI, else a relative reference; None when
  neither parses) and lib/uri.c's query splitting. :mod:`pynbd.libnbd` applies lib/uri.c's
  checks, in libnbd's words, to what they return.

Here, without dataclasses, for what only needs a URI's parts: a tool connecting to a URI
starts without importing dataclasses and inspect (:func:`pynbd.client.negotiate.uri_target`).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping

from pynbd.errors import ConfigError

TYPE_CHECKING = False  # typing is not imported at run time (start-up time)
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "DEFAULT_PORT", "KNOWN_PARAMS", "SCHEMES", "URIError", "XmlURI", "checked", "libnbd_queries",
    "param_value", "parse_libxml2", "split",
]

DEFAULT_PORT = 10809
MAX_PORT = 65535
MAX_VSOCK = 0xFFFF_FFFF  # AF_VSOCK CIDs and ports are 32-bit

#: scheme -> (tls, transport)
SCHEMES: dict[str, tuple[bool, str]] = {
    "nbd": (False, "tcp"),
    "nbds": (True, "tcp"),
    "nbd+unix": (False, "unix"),
    "nbds+unix": (True, "unix"),
    "nbd+vsock": (False, "vsock"),
    "nbds+vsock": (True, "vsock"),
}
_SCHEME_OF = {v: k for k, v in SCHEMES.items()}

#: query parameter -> NBDURI attribute, in the order format_uri emits them (libnbd's order
#: for socket / tls-certificates / tls-psk-file).
KNOWN_PARAMS: dict[str, str] = {
    "socket": "socket",
    "tls-certificates": "tls_certificates",
    "tls-psk-file": "tls_psk_file",
    "tls-hostname": "tls_hostname",
    "tls-type": "tls_type",
    "tls-verify-peer": "tls_verify_peer",
}
_TLS_TYPES = ("anon", "x509", "psk")
_VERIFY_VALUES = {"0": False, "1": True, "false": False, "true": True}

# ---- the grammar: RFC 3986 ---------------------------------------------------------------

_ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_DIGIT = "0123456789"
_HEX = frozenset("0123456789abcdefABCDEF")
_UNRESERVED = _ALPHA + _DIGIT + "-._~"
_SUB_DELIMS = "!$&'()*+,;="
#: Each component's characters (a "%" starts a %XX escape).
_USERINFO = frozenset(_UNRESERVED + _SUB_DELIMS + ":")
_REGNAME = frozenset(_UNRESERVED + _SUB_DELIMS)
_PCHAR = frozenset(_UNRESERVED + _SUB_DELIMS + ":@")
_QUERY = _PCHAR | frozenset("/?")
_FRAGMENT = _QUERY | frozenset("[]")  # libxml2 also takes brackets in a fragment
# pynbd's rules check the same classes with "%" in them, and accept any non-ASCII character
# (read as UTF-8).
_USERINFO_CHARS = _USERINFO | {"%"}
_REGNAME_CHARS = _REGNAME | {"%"}
_PATH_CHARS = _PCHAR | frozenset("/%")
_QUERY_CHARS = _QUERY | {"%"}

#: scheme ":" (a letter, then letters, digits, "+", "-", ".").
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
#: What follows the authority (or the scheme): path, then "?" query, then "#" fragment.
_REST_RE = re.compile(r"([^?#]*)(?:\?([^#]*))?(?:#(.*))?", re.DOTALL)
_BAD_PCT_RE = re.compile(r"%(?![0-9A-Fa-f]{2}).{0,2}", re.DOTALL)
_INT_MAX = (1 << 31) - 1


def _split_rest(rest: str) -> tuple[str, str | None, str | None]:
    """(path, query or None, fragment or None) of what follows the authority."""
    m = _REST_RE.fullmatch(rest)
    assert m is not None  # every string matches
    return m.group(1), m.group(2), m.group(3)


class URIError(ConfigError, ValueError):
    """A malformed or unsupported NBD URI; the message names the problem."""


def checked(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of an NBDURI built from ``fields`` (each of its arguments, as
    :func:`split` returns them): checked (:class:`URIError` names a bad one) and completed,
    with ``scheme`` derived from ``tls`` and ``transport``, the host normalised, and
    ``query`` in step with the typed fields, with its ``warnings``."""
    f = dict(fields)
    tls, transport = f["tls"], f["transport"]
    if not isinstance(tls, bool):
        raise URIError(f"tls must be a bool, not {tls!r}")
    scheme = _SCHEME_OF.get((tls, transport))
    if scheme is None:
        raise URIError(f"unknown NBD transport {transport!r} "
                       "(expected 'tcp', 'unix' or 'vsock')")
    f["scheme"] = scheme
    f["host"] = _check_host(scheme, transport, f["host"])
    _check_port(scheme, transport, f["port"])
    _check_text("export name", f["export"], nul=False)
    if f["user"] is not None:
        _check_text("user name", f["user"], empty=False)
    _check_socket(scheme, transport, f["socket"])
    for attr in ("tls_certificates", "tls_psk_file", "tls_hostname"):
        value = f[attr]
        if value is not None:
            _check_text(_param_name(attr) + "= parameter", value, empty=False,
                        paths=attr != "tls_hostname")
    verify = f["tls_verify_peer"]
    if verify is not None and not isinstance(verify, bool):
        raise URIError(f"tls_verify_peer must be a bool or None, not {verify!r}")
    if f["tls_type"] is not None and f["tls_type"] not in _TLS_TYPES:
        raise URIError(f"invalid tls-type value {f['tls_type']!r} in URI "
                       "(expected anon, x509 or psk)")
    f["query"], f["warnings"] = _sync_query(f)
    return f


def _sync_query(f: dict[str, Any]) -> tuple[dict[str, str], tuple[str, ...]]:
    if not isinstance(f["query"], Mapping):
        raise URIError(f"query must be a mapping, not {type(f['query']).__name__}")
    given = dict(f["query"])
    out: dict[str, str] = {}
    # Typed fields that the given query lacks come first, in KNOWN_PARAMS order.
    for name, attr in KNOWN_PARAMS.items():
        value = f[attr]
        if value is not None and name not in given:
            out[name] = _param_text(value)
    warnings = []
    for name, raw in given.items():
        if not isinstance(name, str) or not isinstance(raw, str):
            raise URIError(f"query parameters must be str: {name!r}={raw!r}")
        if not name:
            raise URIError("empty parameter name in URI query")
        _check_text(f"query parameter name {name!r}", name)
        if name in KNOWN_PARAMS:
            value = f[KNOWN_PARAMS[name]]
            if value is None:
                continue  # the typed field wins: None removes the parameter
            try:
                same = param_value(name, raw) == value
            except URIError:
                same = False
            if not same:
                raw = _param_text(value)
        else:
            _check_text(f"{name}= parameter", raw, paths=True)
            if not name.startswith("x-"):
                warnings.append(name)
        out[name] = raw
    return out, tuple(warnings)


def _param_name(attr: str) -> str:
    return attr.replace("_", "-")


def _param_text(value: str | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return value


def param_value(name: str, raw: str) -> str | bool:
    """Interpret a known parameter's raw (decoded) value; URIError when it is invalid."""
    if name == "tls-verify-peer":
        v = _VERIFY_VALUES.get(raw.lower())
        if v is None:
            raise URIError(f"invalid tls-verify-peer value {raw!r} in URI "
                           "(expected 0, 1, false or true)")
        return v
    if name == "tls-type":
        t = raw.lower()
        if t not in _TLS_TYPES:
            raise URIError(f"invalid tls-type value {raw!r} in URI (expected anon, x509 or psk)")
        return t
    return raw


def _check_text(what: str, value: Any, *, empty: bool = True, nul: bool = True,
                paths: bool = False) -> None:
    if not isinstance(value, str):
        raise URIError(f"{what} must be a str, not {type(value).__name__}")
    if not empty and not value:
        raise URIError(f"empty {what} in URI")
    if not nul and "\0" in value:
        raise URIError(f"{what} in URI contains a NUL byte (%00)")
    try:
        value.encode("utf-8", "surrogateescape" if paths else "strict")
    except UnicodeEncodeError:
        raise URIError(f"{what} in URI is not valid Unicode: {value!r}") from None


def _check_host(scheme: str, transport: str, host: str | None) -> str | None:
    if transport == "unix":
        if host:
            raise URIError(f"{scheme} URI must not have a host ({host!r}): "
                           f"give the socket as {scheme}:///?socket=PATH")
        return None
    if transport == "vsock":
        if host is None or host == "":
            return "2"  # libnbd: no CID means the host (VMADDR_CID_HOST)
        if not isinstance(host, str) or not host.isascii() or not host.isdigit() \
                or int(host) > MAX_VSOCK:
            raise URIError(f"invalid vsock CID {host!r} in URI (must be a number "
                           f"from 0 to {MAX_VSOCK})")
        return str(int(host))
    # TCP
    if host is None or host == "":
        return "localhost"
    _check_text("host", host)
    if len(host) >= 2 and host[0] == "[" and host[-1] == "]":
        host = host[1:-1]
    if ":" in host:
        try:
            import ipaddress  # (only for an IPv6 literal)

            ipaddress.IPv6Address(host)
        except ValueError:
            raise URIError(f"invalid IPv6 address [{host}] in URI") from None
        return host
    bad = [c for c in host if c in "/?#@[]\\" or c.isspace() or not c.isprintable()]
    if bad:
        raise URIError(f"invalid character {bad[0]!r} in URI host {host!r}")
    return host


def _check_port(scheme: str, transport: str, port: Any) -> None:
    if not isinstance(port, int) or isinstance(port, bool):
        raise URIError(f"invalid port {port!r} in URI")
    if transport == "unix":
        if port != DEFAULT_PORT:
            raise URIError(f"{scheme} URI must not have a port")
        return
    top = MAX_VSOCK if transport == "vsock" else MAX_PORT
    if not 1 <= port <= top:
        raise URIError(f"invalid port '{port}' in URI")


def _check_socket(scheme: str, transport: str, sock: str | None) -> None:
    if transport != "unix":
        if sock is not None:
            plain = "nbds" if scheme.startswith("nbds") else "nbd"
            raise URIError(f"socket= parameter is not allowed in an {scheme} URI "
                           f"(did you mean {plain}+unix:///?socket=...?)")
        return
    if sock is None:
        raise URIError(f"{scheme} URI needs a socket= parameter "
                       f"(e.g. {scheme}:///?socket=/path/to/sock)")
    _check_text("socket= parameter", sock, empty=False, paths=True)
    if "\0" in sock[1:]:
        raise URIError("socket= parameter contains a NUL byte "
                       "(only an abstract socket may start with %00)")


# ---- parsing ----------------------------------------------------------------------------


def _decode(part: str, what: str, *, paths: bool = False) -> str:
    m = _BAD_PCT_RE.search(part)
    if m:
        raise URIError(f"invalid percent-encoding {m.group()!r} in URI {what}")
    try:
        return urllib.parse.unquote(part, "utf-8", "surrogateescape" if paths else "strict")
    except UnicodeDecodeError:
        raise URIError(f"percent-encoded {what} in URI is not valid UTF-8") from None


def _check_chars(part: str, allowed: frozenset[str], what: str) -> None:
    for c in part:
        if c not in allowed and (c.isascii() or not c.isprintable()):
            hint = " (percent-encode it as %20)" if c == " " else ""
            raise URIError(f"invalid character {c!r} in URI {what}{hint}")


def _no_scheme_error(text: str, scheme: str | None = None) -> URIError:
    if scheme is None:
        msg = ("NBD URI does not have a scheme: valid NBD URIs should start with a scheme "
               "like nbd://, nbds:// or nbd+unix://")
    else:
        msg = f"unknown NBD URI scheme {scheme!r}"
    if text.startswith("/"):
        msg += ': to open a local socket use "nbd+unix:///?socket=PATH"'
    elif text[:9].lower() == "localhost":
        msg += ': to open a local port use "nbd://localhost" or "nbd://localhost:PORT"'
    return URIError(msg)


def split(text: str) -> dict[str, Any]:
    """Parse an NBD URI into the keyword arguments of :class:`~pynbd.protocol.uri.NBDURI`,
    every one of them (what :func:`checked` checks); raise :class:`URIError` naming a syntax
    problem."""
    if not isinstance(text, str):
        raise URIError(f"NBD URI must be a str, not {type(text).__name__}")
    m = _SCHEME_RE.match(text)
    if not m:
        raise _no_scheme_error(text)
    scheme = m.group(1).lower()
    if scheme not in SCHEMES:
        raise _no_scheme_error(text, m.group(1))
    rest = text[m.end():]
    if not rest.startswith("//"):
        hint = ""
        if scheme == "nbd":
            hint = " (qemu-style 'nbd:HOST:PORT' and 'nbd:unix:PATH' strings are not NBD URIs)"
        raise URIError(f"URI must begin with '{scheme}://'{hint}")
    tls, transport = SCHEMES[scheme]
    rest = rest[2:]
    end = len(rest)
    for stop in "/?#":
        k = rest.find(stop)
        if 0 <= k < end:
            end = k
    authority = rest[:end]
    path, query_raw, fragment = _split_rest(rest[end:])
    if fragment is not None:
        raise URIError("NBD URI must not have a fragment: percent-encode '#' as %23")
    query_raw = query_raw or ""

    # Authority: [userinfo@]host[:port]
    userinfo, at, hostport = authority.rpartition("@")
    user = None
    if at:
        _check_chars(userinfo, _USERINFO_CHARS, "user name")
        user = _decode(userinfo, "user name") or None
    host, port_raw = _split_hostport(hostport)  # checked() checks it against the transport
    port = DEFAULT_PORT
    if port_raw is not None and port_raw != "":  # "h:" is an empty port: the default
        if transport == "unix":
            raise URIError(f"{scheme} URI must not have a port")
        top = MAX_VSOCK if transport == "vsock" else MAX_PORT
        if not (port_raw.isascii() and port_raw.isdigit()) or not 1 <= int(port_raw) <= top:
            raise URIError(f"invalid port {port_raw!r} in URI")
        port = int(port_raw)

    # Path: the export name is everything after the first "/".
    _check_chars(path, _PATH_CHARS, "path")
    export = _decode(path[1:], "export name")

    query = _split_query(query_raw)
    typed = {attr: param_value(name, query[name]) if name in query else None
             for name, attr in KNOWN_PARAMS.items()}
    return dict(tls=tls, transport=transport, host=host, port=port, export=export,
                user=user, query=query, **typed)


def _split_query(query_raw: str) -> dict[str, str]:
    """``name=value`` pairs joined by ``&``, percent-decoded; no duplicates."""
    _check_chars(query_raw, _QUERY_CHARS, "query")
    query: dict[str, str] = {}
    for param in query_raw.split("&") if query_raw else ():
        if not param:
            continue  # "a=1&&b=2", a trailing "&": empty sections are skipped (as libnbd)
        raw_name, _, raw_value = param.partition("=")
        if not raw_name:
            raise URIError(f"empty parameter name in URI query ({param!r})")
        name = _decode(raw_name, "query parameter name")
        if name in query:
            raise URIError(f"duplicate parameter {name!r} in URI")
        query[name] = _decode(raw_value, f"{name}= parameter", paths=True)
    return query


def _split_hostport(hostport: str) -> tuple[str, str | None]:
    """Split ``host[:port]`` (host possibly ``[IPv6]``); decode and validate the host."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise URIError(f"unterminated '[' in URI host {hostport!r}")
        literal, after = hostport[1:end], hostport[end + 1:]
        if after and not after.startswith(":"):
            raise URIError(f"unexpected {after!r} after IPv6 address in URI")
        _check_chars(literal, frozenset(_UNRESERVED + ":%"), "IPv6 address")
        addr = _decode(literal, "IPv6 address")  # fe80::1%25eth0 -> zone "eth0"
        if literal.lower().startswith("v") or ":" not in addr:
            raise URIError(f"invalid IPv6 address [{literal}] in URI")
        try:
            import ipaddress  # (only for an IPv6 literal)

            ipaddress.IPv6Address(addr)
        except ValueError:
            raise URIError(f"invalid IPv6 address [{literal}] in URI") from None
        return addr, (after[1:] if after else None)
    host, colon, port = hostport.partition(":")
    if colon and ":" in port:
        raise URIError(f"IPv6 address in URI must be enclosed in [...]: {hostport!r}")
    _check_chars(host, _REGNAME_CHARS, "host")
    host = _decode(host, "host")
    return host, (port if colon else None)


# ---- libnbd's behaviour: libxml2 2.9's xmlParseURI, lib/uri.c's queries -------------------


class XmlURI:
    """The fields of libxml2's xmlURI that libnbd reads (``None`` where libxml2 has NULL);
    ``port`` is 0 when there is none (-1 with an authority but no host)."""

    __slots__ = ("path", "port", "query_raw", "scheme", "server", "user")

    def __init__(self, scheme: str | None = None) -> None:
        self.scheme = scheme
        self.server: str | None = None
        self.user: str | None = None
        self.port = 0
        self.path: str | None = None
        self.query_raw: str | None = None


def parse_libxml2(text: str) -> XmlURI | None:
    """Parse ``text`` as libxml2 2.9's xmlParseURI does: as an absolute URI, else as a
    relative reference (which has no scheme); None if it is neither."""
    m = _SCHEME_RE.match(text)
    if m is not None:
        u = XmlURI(text[:m.end() - 1])
        if _xml_hier(text, m.end(), u, relative=False):
            return u
    u = XmlURI()
    return u if _xml_hier(text, 0, u, relative=True) else None


def _xml_hier(text: str, i: int, u: XmlURI, relative: bool) -> bool:
    """What follows the scheme (or all of a relative reference): ``//`` authority and an
    absolute-or-empty path, or a path alone; then the query and the fragment."""
    if text.startswith("//", i):
        i = _xml_authority(text, i + 2, u)
        if i < 0:
            return False
        if u.server is None and not relative:
            u.port = -1
        kind = "abempty"
    else:
        kind = "noscheme" if relative else "rootless"
    path, query, fragment = _split_rest(text[i:])
    if not _xml_path_ok(path, kind):
        return False
    if query is not None and not _xml_chars_ok(query, _QUERY):
        return False
    if fragment is not None and not _xml_chars_ok(fragment, _FRAGMENT):
        return False
    u.path = _xml_unescape(path) if path else None
    u.query_raw = query
    return True


def _xml_path_ok(path: str, kind: str) -> bool:
    """An absolute-or-empty path after an authority; otherwise an absolute, rootless (after
    a scheme) or noscheme (a relative reference's: no ":" in its first segment) path, or
    none."""
    if not path:
        return True
    if kind == "abempty" and not path.startswith("/"):
        return False
    if not path.startswith("/") and kind == "noscheme" and ":" in path.split("/", 1)[0]:
        return False
    return all(_xml_chars_ok(seg, _PCHAR) for seg in path.split("/"))


def _xml_chars_ok(part: str, allowed: frozenset[str]) -> bool:
    """Every character is in ``allowed`` or starts a %XX escape."""
    i, n = 0, len(part)
    while i < n:
        c = part[i]
        if c == "%":
            if i + 2 < n and part[i + 1] in _HEX and part[i + 2] in _HEX:
                i += 3
                continue
            return False
        if c not in allowed:
            return False
        i += 1
    return True


def _xml_scan(text: str, i: int, allowed: frozenset[str]) -> int:
    """Skip characters of ``allowed`` and %XX escapes from ``i``."""
    n = len(text)
    while i < n:
        c = text[i]
        if c == "%":
            if i + 2 < n and text[i + 1] in _HEX and text[i + 2] in _HEX:
                i += 3
                continue
            return i
        if c not in allowed:
            return i
        i += 1
    return i


def _xml_authority(text: str, i: int, u: XmlURI) -> int:
    """``[userinfo "@"] host [":" port]`` from ``i``, as libxml2 scans it (a bracketed host
    runs to the first "]" that follows, wherever it is); the index after it, or -1."""
    j = _xml_scan(text, i, _USERINFO)
    if j < len(text) and text[j] == "@":
        u.user = _xml_unescape(text[i:j])
        i = j + 1
    start = i
    if i < len(text) and text[i] == "[":
        end = text.find("]", i + 1)
        if end < 0:
            return -1
        i = end + 1
    else:
        i = _xml_scan(text, i, _REGNAME)
    u.server = _xml_unescape(text[start:i]) if i > start else None
    if i < len(text) and text[i] == ":":
        j = i + 1
        while j < len(text) and text[j] in _DIGIT:
            j += 1
        if j == i + 1 or int(text[i + 1:j]) > _INT_MAX:
            return -1
        u.port = int(text[i + 1:j])
        i = j
    if i < len(text) and text[i] not in "/?#":
        return -1
    return i


def _xml_unescape(s: str) -> str:
    """xmlURIUnescapeString: %XX decoded (as bytes, read back as UTF-8), cut at a NUL."""
    if "%" in s:
        raw = bytearray()
        i = 0
        while i < len(s):
            if s[i] == "%" and i + 2 < len(s) and s[i + 1] in _HEX and s[i + 2] in _HEX:
                raw.append(int(s[i + 1:i + 3], 16))
                i += 3
            else:
                raw += s[i].encode()
                i += 1
        s = raw.decode("utf-8", "surrogateescape")
    return s.split("\0", 1)[0]


def libnbd_queries(query_raw: str | None) -> list[tuple[str, str]]:
    """lib/uri.c's parse_uri_queries: ``&`` (or, failing that, ``;``) separated, decoded;
    an empty section or one starting with "=" is ignored."""
    out: list[tuple[str, str]] = []
    q = query_raw or ""
    while q:
        end = q.find("&")
        if end < 0:
            end = q.find(";")
        if end < 0:
            end = len(q)
        eq = q.find("=", 0, end)
        if end == 0 or eq == 0:
            pass
        elif eq < 0:
            out.append((_xml_unescape(q[:end]), ""))
        else:
            out.append((_xml_unescape(q[:eq]), _xml_unescape(q[eq + 1:end])))
        q = q[end + 1:]
    return out
