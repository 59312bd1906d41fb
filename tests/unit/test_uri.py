"""NBD URIs: parse_uri / format_uri / make_uri (doc/uri.md + libnbd's rules and forms)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.errors import ConfigError
from pynbd.protocol.uri import (
    KNOWN_PARAMS,
    NBDURI,
    URIError,
    format_uri,
    make_uri,
    parse_uri,
)

# ---- parsing: the examples of doc/uri.md and the reference -------------------------------


@pytest.mark.parametrize("text, export", [
    ("nbd://example.com/disk", "disk"),
    ("nbd+unix:///disk?socket=sock", "disk"),
    ("nbd://example.com/", ""),
    ("nbd://example.com", ""),
    ("nbd://example.com//disk", "/disk"),
    ("nbd://example.com/hello%20world", "hello world"),
    ("nbd://h/a/b/c", "a/b/c"),
    ("nbd://h/a%2Fb", "a/b"),
    ("nbd://h/caf%C3%A9", "café"),
    ("nbd://h/café", "café"),                       # raw non-ASCII is read as UTF-8
    ("nbd://h/a+b", "a+b"),                         # "+" is not a space
    ("nbd://h/?x-a=1", ""),
    ("nbd://h?x-a=1", ""),
])
def test_export_name(text: str, export: str) -> None:
    assert parse_uri(text).export == export


def test_tcp_fields() -> None:
    u = parse_uri("nbd://example.com:10810/disk")
    assert (u.scheme, u.tls, u.transport, u.host, u.port) == ("nbd", False, "tcp",
                                                              "example.com", 10810)
    assert u.socket is None and u.user is None and u.query == {} and u.warnings == ()
    assert parse_uri("nbd://h").port == 10809
    assert parse_uri("nbd://h:/").port == 10809     # an empty port is the default (RFC 3986)


@pytest.mark.parametrize("text, host", [
    ("nbd://", "localhost"),
    ("nbd:///", "localhost"),
    ("nbd://:10810/", "localhost"),
    ("nbd://alice@/", "localhost"),
    ("nbd://127.0.0.1/", "127.0.0.1"),
    ("nbd://[::1]/", "::1"),
    ("nbd://[fe80::1%25eth0]/", "fe80::1%eth0"),    # RFC 6874 zone
    ("nbd://Example.COM/", "Example.COM"),          # case kept
])
def test_host(text: str, host: str) -> None:
    assert parse_uri(text).host == host


def test_ipv6() -> None:
    u = parse_uri("nbd://[::1]:10810/x")
    assert (u.host, u.port, u.export) == ("::1", 10810, "x")
    assert format_uri(u) == "nbd://[::1]:10810/x"


def test_unix() -> None:
    u = parse_uri("nbd+unix:///e?socket=/tmp/s")
    assert (u.scheme, u.tls, u.transport, u.host, u.socket, u.export) == (
        "nbd+unix", False, "unix", None, "/tmp/s", "e")
    assert u.query == {"socket": "/tmp/s"}
    assert not u.is_abstract
    # the spec's own example: a relative socket name
    assert parse_uri("nbd+unix:///disk?socket=sock").socket == "sock"
    assert parse_uri("nbd+unix://?socket=/s").export == ""   # nbdkit's -U - form
    assert parse_uri("nbd+unix:///?socket=%2Ftmp%2Fs").socket == "/tmp/s"
    assert parse_uri("nbd+unix:///?socket=/tmp/a%20b").socket == "/tmp/a b"


def test_unix_tls_user_psk() -> None:
    u = parse_uri("nbds+unix://alice@/?socket=/s&tls-psk-file=/k")
    assert (u.scheme, u.tls, u.transport, u.user, u.socket, u.tls_psk_file, u.export) == (
        "nbds+unix", True, "unix", "alice", "/s", "/k", "")
    assert u.query == {"socket": "/s", "tls-psk-file": "/k"}
    assert u.warnings == ()


def test_abstract_socket() -> None:
    u = parse_uri("nbd+unix:///?socket=%00/abstract")
    assert u.socket == "\0/abstract" and u.is_abstract
    assert format_uri(u) == "nbd+unix:///?socket=%00/abstract"
    assert parse_uri("nbd+unix:///?socket=%00name").socket == "\0name"


def test_vsock() -> None:
    u = parse_uri("nbd+vsock://2:10809/e")
    assert (u.scheme, u.transport, u.host, u.vsock_cid, u.port, u.export) == (
        "nbd+vsock", "vsock", "2", 2, 10809, "e")
    assert parse_uri("nbds+vsock://1:4000000000").port == 4000000000  # 32-bit vsock ports
    assert parse_uri("nbd+vsock://").vsock_cid == 2                   # libnbd: the host
    assert parse_uri("nbd+vsock://007/").host == "7"
    assert parse_uri("nbd+vsock://4294967295/").vsock_cid == 0xFFFFFFFF
    with pytest.raises(URIError, match="no vsock CID"):
        _ = parse_uri("nbd://h").vsock_cid


@pytest.mark.parametrize("text, scheme, tls, transport", [
    ("nbd://h", "nbd", False, "tcp"),
    ("nbds://h", "nbds", True, "tcp"),
    ("nbd+unix:///?socket=/s", "nbd+unix", False, "unix"),
    ("nbds+unix:///?socket=/s", "nbds+unix", True, "unix"),
    ("nbd+vsock://3", "nbd+vsock", False, "vsock"),
    ("nbds+vsock://3", "nbds+vsock", True, "vsock"),
    ("NBD://h", "nbd", False, "tcp"),
    ("NbDs+UniX:///?socket=/s", "nbds+unix", True, "unix"),
])
def test_schemes(text: str, scheme: str, tls: bool, transport: str) -> None:
    u = parse_uri(text)
    assert (u.scheme, u.tls, u.transport) == (scheme, tls, transport)


def test_user() -> None:
    assert parse_uri("nbds://alice@h/").user == "alice"
    assert parse_uri("nbds://al%20ice@h/").user == "al ice"
    assert parse_uri("nbds://a:b@h/").user == "a:b"     # the whole userinfo, as libnbd
    assert parse_uri("nbds://@h/").user is None


def test_tls_params() -> None:
    u = parse_uri("nbds://h/?tls-type=x509&tls-hostname=srv.example&tls-verify-peer=0"
                  "&tls-certificates=/etc/pki/nbd")
    assert (u.tls_type, u.tls_hostname, u.tls_verify_peer, u.tls_certificates) == (
        "x509", "srv.example", False, "/etc/pki/nbd")
    assert u.warnings == ()
    for raw, value in [("0", False), ("1", True), ("false", False), ("true", True),
                       ("TRUE", True)]:
        assert parse_uri(f"nbds://h/?tls-verify-peer={raw}").tls_verify_peer is value
    for t in ("anon", "x509", "psk", "PSK"):
        assert parse_uri(f"nbds://h/?tls-type={t}").tls_type == t.lower()
    # allowed with nbd:// too (opportunistic TLS)
    assert parse_uri("nbd://h/?tls-type=psk").tls_type == "psk"


def test_query_kept_and_unknown_params_warned() -> None:
    u = parse_uri("nbd://h/?x-foo=1&tls-username=bob&bogus&a%20b=c%26d&&")
    assert u.query == {"x-foo": "1", "tls-username": "bob", "bogus": "", "a b": "c&d"}
    assert u.warnings == ("tls-username", "bogus", "a b")   # x-* is silent
    assert parse_uri("nbd://h/?x-a=1&x-b").warnings == ()
    assert parse_uri("nbd://h/?Socket=/s").warnings == ("Socket",)  # names are case-sensitive
    assert parse_uri("nbd://h/?a=1;b=2").query == {"a": "1;b=2"}   # only "&" separates
    assert parse_uri("nbd://h/?a=b=c").query == {"a": "b=c"}
    assert parse_uri("nbd://h/?a=x+y").query == {"a": "x+y"}


def test_socket_path_bytes_round_trip() -> None:
    # Linux paths need not be UTF-8: they decode with surrogateescape, like os.fsdecode.
    u = parse_uri("nbd+unix:///?socket=/tmp/%FF")
    assert u.socket == "/tmp/\udcff"
    assert format_uri(u) == "nbd+unix:///?socket=/tmp/%FF"


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("", "NBD URI does not have a scheme"),
    ("/tmp/sock", r'NBD URI does not have a scheme.*nbd\+unix:///\?socket=PATH'),
    ("localhost:10809", "unknown NBD URI scheme 'localhost': to open a local port"),
    ("http://h/", "unknown NBD URI scheme 'http'"),
    ("nbd+tcp://h/", r"unknown NBD URI scheme 'nbd\+tcp'"),
    ("nbd:unix:/tmp/s", "URI must begin with 'nbd://' .*qemu-style"),
    ("nbd:h:10809", "URI must begin with 'nbd://'"),
    ("nbds:/h", "URI must begin with 'nbds://'"),
    ("nbd+unix:/?socket=/s", r"URI must begin with 'nbd\+unix://'"),
    ("nbd://h:99999/", "invalid port '99999' in URI"),
    ("nbd://h:65536/", "invalid port '65536' in URI"),
    ("nbd://h:0/", "invalid port '0' in URI"),
    ("nbd://h:-1/", "invalid port '-1' in URI"),
    ("nbd://h:x/", "invalid port 'x' in URI"),
    ("nbd://h:1:2/", "IPv6 address in URI must be enclosed"),
    ("nbd://::1/", r"IPv6 address in URI must be enclosed in \[...\]"),
    ("nbd://[::1/", r"unterminated '\[' in URI host"),
    ("nbd://[::1]x/", r"unexpected 'x' after IPv6 address"),
    ("nbd://[zz]/", r"invalid IPv6 address \[zz\] in URI"),
    ("nbd://[127.0.0.1]/", r"invalid IPv6 address \[127.0.0.1\]"),
    ("nbd://[v1.x]/", r"invalid IPv6 address \[v1.x\]"),
    ("nbd://[fe80::1%eth0]/", "invalid percent-encoding '%et'"),
    ("nbd://a%2Fb/", "invalid character '/' in URI host"),
    ("nbd://h%20x/", "invalid character ' ' in URI host"),
    ("nbd://h/a b", r"invalid character ' ' in URI path \(percent-encode it as %20\)"),
    ("nbd://h/a\tb", r"invalid character '\\t' in URI path"),
    ("nbd://h/[x]", r"invalid character '\[' in URI path"),
    ("nbd://h/?a=<", "invalid character '<' in URI query"),
    (" nbd://h/", "NBD URI does not have a scheme"),
    ("nbd://h/ ", "invalid character ' ' in URI path"),
    ("nbd://h/%zz", "invalid percent-encoding '%zz' in URI export name"),
    ("nbd://h/%2", "invalid percent-encoding '%2' in URI export name"),
    ("nbd://h/%ff", "percent-encoded export name in URI is not valid UTF-8"),
    ("nbd://h/%00", r"export name in URI contains a NUL byte \(%00\)"),
    ("nbd://h/#frag", "NBD URI must not have a fragment"),
    ("nbd://h/?x-a=1#f", "NBD URI must not have a fragment"),
    ("nbd://a b@h/", "invalid character ' ' in URI user name"),
    ("nbd+unix:///", r"nbd\+unix URI needs a socket= parameter"),
    ("nbds+unix:///e?x-socket=/s", r"nbds\+unix URI needs a socket= parameter"),
    ("nbd+unix:///?socket=", "empty socket= parameter in URI"),
    ("nbd+unix:///?socket", "empty socket= parameter in URI"),
    ("nbd+unix:///?socket=/a%00b", "socket= parameter contains a NUL byte"),
    ("nbd+unix://h/?socket=/s", r"nbd\+unix URI must not have a host \('h'\)"),
    ("nbd+unix://localhost/?socket=/s", r"nbd\+unix URI must not have a host \('localhost'\)"),
    ("nbd+unix://:10809/?socket=/s", r"nbd\+unix URI must not have a port"),
    ("nbd://h/?socket=/s", (r"socket= parameter is not allowed in an nbd URI "
                            r"\(did you mean nbd\+unix:///\?socket=...\?\)")),
    ("nbds://h/?socket=/s", r"not allowed in an nbds URI \(did you mean nbds\+unix"),
    ("nbd+vsock://1/?socket=/s", r"socket= parameter is not allowed in an nbd\+vsock URI"),
    ("nbd+vsock://foo/", "invalid vsock CID 'foo' in URI"),
    ("nbd+vsock://-1/", "invalid vsock CID '-1' in URI"),
    ("nbd+vsock://4294967296/", "invalid vsock CID '4294967296' in URI"),
    ("nbd+vsock://[::1]/", "invalid vsock CID '::1' in URI"),
    ("nbd+vsock://2:0/", "invalid port '0' in URI"),
    ("nbd+vsock://2:4294967296/", "invalid port '4294967296' in URI"),
    ("nbd://h/?a=1&a=2", "duplicate parameter 'a' in URI"),
    ("nbd+unix:///?socket=/a&socket=/b", "duplicate parameter 'socket' in URI"),
    ("nbd://h/?a=1&%61=2", "duplicate parameter 'a' in URI"),
    ("nbd://h/?=v", r"empty parameter name in URI query \('=v'\)"),
    ("nbd://h/?a=%zz", "invalid percent-encoding '%zz' in URI a= parameter"),
    ("nbd://h/?%ff=1", "percent-encoded query parameter name in URI is not valid UTF-8"),
    ("nbds://h/?tls-verify-peer=maybe", ("invalid tls-verify-peer value 'maybe' in URI "
                                         r"\(expected 0, 1, false or true\)")),
    ("nbds://h/?tls-verify-peer", "invalid tls-verify-peer value ''"),
    ("nbds://h/?tls-type=kerberos", (r"invalid tls-type value 'kerberos' in URI "
                                     r"\(expected anon, x509 or psk\)")),
    ("nbds://h/?tls-psk-file=", "empty tls-psk-file= parameter in URI"),
    ("nbds://h/?tls-certificates", "empty tls-certificates= parameter in URI"),
    ("nbds://h/?tls-hostname=", "empty tls-hostname= parameter in URI"),
])
def test_errors(text: str, message: str) -> None:
    with pytest.raises(URIError, match=message):
        parse_uri(text)


def test_error_classes() -> None:
    with pytest.raises(ValueError):
        parse_uri("http://h")
    with pytest.raises(ConfigError):
        parse_uri("http://h")
    with pytest.raises(URIError, match="must be a str"):
        parse_uri(b"nbd://h")  # type: ignore[arg-type]


# ---- building -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, out", [
    # libnbd nbd_get_uri forms: the path always starts with "/"
    ("nbd://127.0.0.1:10999", "nbd://127.0.0.1:10999/"),
    ("nbd://h", "nbd://h/"),
    ("nbd://h:10809/", "nbd://h/"),
    ("nbd://", "nbd://localhost/"),
    ("nbd+unix://?socket=/tmp/s", "nbd+unix:///?socket=/tmp/s"),
    ("nbd+unix:///foo?socket=/tmp/s", "nbd+unix:///foo?socket=/tmp/s"),
    ("nbds+unix://alice@/?socket=/s&tls-psk-file=/k",
     "nbds+unix://alice@/?socket=/s&tls-psk-file=/k"),
    ("nbd+vsock://1:10901", "nbd+vsock://1:10901/"),
    ("nbd+vsock://", "nbd+vsock://2/"),
    ("NBDS://h/a%20b", "nbds://h/a%20b"),
    ("nbd://h/a%2fb", "nbd://h/a/b"),
    ("nbd://h/%61", "nbd://h/a"),
    ("nbd://h/a:b", "nbd://h/a%3Ab"),                   # libxml2 escapes ":" in paths
    ("nbd://h/a;@&=+$,!*'()~", "nbd://h/a;@&=+$,!*'()~"),
    ("nbd://h/caf%C3%A9", "nbd://h/caf%C3%A9"),
    ("nbd://h/café", "nbd://h/caf%C3%A9"),
    ("nbd://[::1]", "nbd://[::1]/"),
    ("nbd://[fe80::1%25eth0]:1/", "nbd://[fe80::1%25eth0]:1/"),
    ("nbd://h/?bogus", "nbd://h/?bogus="),
    ("nbd://h/?a=b%3Dc&x-y=%2Fz", "nbd://h/?a=b%3Dc&x-y=/z"),
    ("nbds://h/?tls-verify-peer=true", "nbds://h/?tls-verify-peer=true"),
    ("nbd+unix:///?socket=/tmp/a%20b&x-z=1", "nbd+unix:///?socket=/tmp/a%20b&x-z=1"),
])
def test_format(text: str, out: str) -> None:
    assert format_uri(parse_uri(text)) == out
    assert str(parse_uri(text)) == out


def test_format_always_port() -> None:
    assert format_uri(parse_uri("nbd://h/x"), always_port=True) == "nbd://h:10809/x"
    assert format_uri(parse_uri("nbd+vsock://3"), always_port=True) == "nbd+vsock://3:10809/"
    assert format_uri(parse_uri("nbd+unix:///?socket=/s"), always_port=True) == \
        "nbd+unix:///?socket=/s"


def test_make_uri() -> None:
    assert make_uri() == "nbd://localhost/"
    assert make_uri(host="h", port=10901, export="a b") == "nbd://h:10901/a%20b"
    assert make_uri(host="::1") == "nbd://[::1]/"
    assert make_uri(host="[::1]", port=2) == "nbd://[::1]:2/"
    assert make_uri(transport="unix", socket="/tmp/x y/sock", export="foo") == \
        "nbd+unix:///foo?socket=/tmp/x%20y/sock"
    assert make_uri(transport="unix", socket="\0abs") == "nbd+unix:///?socket=%00abs"
    assert make_uri(tls=True, transport="unix", socket="/s", user="alice",
                    tls_psk_file="/k") == "nbds+unix://alice@/?socket=/s&tls-psk-file=/k"
    assert make_uri(transport="vsock", host="1", port=10901) == "nbd+vsock://1:10901/"
    assert make_uri(tls=True, tls_certificates="/pki", tls_verify_peer=False, tls_type="X509",
                    tls_hostname="srv", x_foo="1") == (
        "nbds://localhost/?tls-certificates=/pki&tls-hostname=srv&tls-type=x509"
        "&tls-verify-peer=0&x-foo=1")
    assert make_uri(tls_verify_peer="true") == "nbd://localhost/?tls-verify-peer=1"
    assert make_uri(**{"x-a b": "c&d"}) == "nbd://localhost/?x-a%20b=c%26d"


@pytest.mark.parametrize("kw, message", [
    ({"transport": "tcp", "socket": "/s"}, "socket= parameter is not allowed in an nbd URI"),
    ({"transport": "unix"}, r"nbd\+unix URI needs a socket= parameter"),
    ({"transport": "unix", "socket": "/s", "host": "h"}, "must not have a host"),
    ({"transport": "unix", "socket": "/s", "port": 1}, "must not have a port"),
    ({"transport": "sctp"}, "unknown NBD transport 'sctp'"),
    ({"port": 0}, "invalid port '0' in URI"),
    ({"port": 65536}, "invalid port '65536' in URI"),
    ({"port": True}, "invalid port True in URI"),
    ({"transport": "vsock", "host": "x"}, "invalid vsock CID 'x'"),
    ({"host": "a/b"}, "invalid character '/' in URI host"),
    ({"host": "::zz"}, r"invalid IPv6 address \[::zz\]"),
    ({"export": "a\0b"}, "export name in URI contains a NUL byte"),
    ({"export": "\udcff"}, "export name in URI is not valid Unicode"),
    ({"user": ""}, "empty user name in URI"),
    ({"tls_type": "gss"}, "invalid tls-type value 'gss'"),
    ({"tls_verify_peer": "maybe"}, "invalid tls-verify-peer value 'maybe'"),
    ({"tls_psk_file": ""}, "empty tls-psk-file= parameter"),
    ({"x_n": 1}, "x-n= parameter must be a str"),
])
def test_make_uri_errors(kw: dict, message: str) -> None:
    with pytest.raises(URIError, match=message):
        make_uri(**kw)


def test_typed_fields_drive_the_query() -> None:
    u = parse_uri("nbds+unix:///?socket=/a&tls-verify-peer=true&x-k=v")
    # replace(): the typed fields win and the query follows them
    v = dataclasses.replace(u, socket="/b", tls_verify_peer=False)
    assert v.query == {"socket": "/b", "tls-verify-peer": "0", "x-k": "v"}
    assert format_uri(v) == "nbds+unix:///?socket=/b&tls-verify-peer=0&x-k=v"
    w = dataclasses.replace(u, tls_verify_peer=None)
    assert w.query == {"socket": "/a", "x-k": "v"}
    assert dataclasses.replace(u, tls=False).scheme == "nbd+unix"
    # the scheme is derived, never given
    with pytest.raises(TypeError):
        NBDURI(scheme="nbd")  # type: ignore[call-arg]
    # equal parsed forms compare (and hash) equal
    assert parse_uri("nbd://h:10809") == parse_uri("NBD://h/")
    assert hash(parse_uri("nbd://h:10809")) == hash(parse_uri("NBD://h/"))
    assert parse_uri("nbd://h/?a=1&b=2") == parse_uri("nbd://h/?b=2&a=1")


def test_frozen() -> None:
    u = parse_uri("nbd://h/")
    with pytest.raises(dataclasses.FrozenInstanceError):
        u.port = 1  # type: ignore[misc]


# ---- properties ---------------------------------------------------------------------------

_NO_NUL = st.characters(blacklist_characters="\0", blacklist_categories=("Cs",))
_texts = st.text(_NO_NUL, max_size=12)
_nonempty = st.text(_NO_NUL, min_size=1, max_size=12)
_hostnames = st.one_of(
    st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,15}[A-Za-z0-9])?", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.text(st.characters(blacklist_characters="/?#@[]\\:", blacklist_categories=(
        "Cs", "Cc", "Zs", "Zl", "Zp", "Cf", "Co", "Cn")), min_size=1, max_size=8),
)
_extra_names = st.one_of(
    st.from_regex(r"x-[a-z0-9-]{1,8}", fullmatch=True),
    st.text(_NO_NUL, min_size=1, max_size=8),
).filter(lambda n: n not in KNOWN_PARAMS)


@st.composite
def nbd_uris(draw: st.DrawFn) -> NBDURI:
    transport = draw(st.sampled_from(["tcp", "unix", "vsock"]))
    kw: dict = {"tls": draw(st.booleans()), "transport": transport,
                "export": draw(_texts), "user": draw(st.none() | _nonempty)}
    if transport == "tcp":
        kw["host"] = draw(st.none() | _hostnames)
        kw["port"] = draw(st.integers(1, 65535))
    elif transport == "vsock":
        kw["host"] = draw(st.none() | st.integers(0, 2**32 - 1).map(str))
        kw["port"] = draw(st.integers(1, 2**32 - 1))
    else:
        kw["socket"] = draw(st.one_of(_nonempty, _nonempty.map(lambda s: "\0" + s)))
    kw["tls_certificates"] = draw(st.none() | _nonempty)
    kw["tls_psk_file"] = draw(st.none() | _nonempty)
    kw["tls_hostname"] = draw(st.none() | _nonempty)
    kw["tls_verify_peer"] = draw(st.none() | st.booleans())
    kw["tls_type"] = draw(st.none() | st.sampled_from(["anon", "x509", "psk"]))
    kw["query"] = draw(st.dictionaries(_extra_names, st.text(max_size=8), max_size=3))
    return NBDURI(**kw)


@settings(max_examples=200, deadline=None)
@given(nbd_uris())
def test_round_trip(u: NBDURI) -> None:
    text = format_uri(u)
    v = parse_uri(text)
    assert v == u
    assert v.warnings == u.warnings
    assert format_uri(v) == text
    assert parse_uri(format_uri(u, always_port=True)) == u


_uri_chars = st.sampled_from(list("nbds+unixvock:/[]@?&=%#.-_~!$'()*,;0123456789AFaf \0é\t"))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["nbd://", "nbds://", "nbd+unix://", "nbds+vsock://", "nbd:", ""]),
       st.text(_uri_chars, max_size=30))
def test_parse_garbage_is_valid_or_uri_error(prefix: str, tail: str) -> None:
    """Any text either parses (and then round-trips) or raises URIError, nothing else."""
    try:
        u = parse_uri(prefix + tail)
    except URIError:
        return
    assert parse_uri(format_uri(u)) == u
