"""The ip filter with IP address rules (nbdkit 1.32 as built here cannot read addresses, so
these are pynbd's alone), how it reads a client's source, and -D ip.rules=1."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from side_by_side import probe

from pynbd.errors import ConfigError
from pynbd.filters.ip import IpFilter, _parse_rules, _peer
from pynbd.plugin import ConnectionInfo

TCP = [
    (["allow=127.0.0.1", "deny=all"], True),
    (["allow=127.0.0.0/8", "deny=all"], True),
    (["allow=10.0.0.0/8", "deny=all"], False),
    (["deny=127.0.0.1/32"], False),
    (["deny=127.0.0.2"], True),
    (["deny=0.0.0.0/0"], False),
    (["deny=::1,::/0"], True),  # an IPv4 client never matches IPv6 rules
    ([f"allow=uid:{os.getuid()},127.0.0.1", "deny=all"], True),  # uid: not last: fine
    (["allow=192.168.0.0/16,", "deny=127.0.0.1"], False),  # a trailing comma
    (["allow=::ffff:127.0.0.1", "deny=all"], False),  # a mapped address is IPv6
]


def _let_in(factory, params: list[str]) -> bool:
    srv = factory("--filter=ip", "memory", "1M", *params, tcp=True)
    return "connect_error" not in probe(srv.uri, [("pread", 512, 0)])


def test_address_rules() -> None:
    """Each rule list against a client at 127.0.0.1 (the filter as the server calls it)."""
    client = _peer(ConnectionInfo(peer="('127.0.0.1', 40000)"))
    for params, want in TCP:
        f = IpFilter()
        for p in params:
            key, _, value = p.partition("=")
            f.config(None, key, value)
        assert f.allowed(client) == want, params


def test_address_rules_over_tcp(pynbd_server) -> None:
    """The same through a real server and client, for two of them."""
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda c: _let_in(pynbd_server, c[0]), [TCP[1], TCP[3]]))
    assert got == [TCP[1][1], TCP[3][1]]


def test_debug_rules(pynbd_server) -> None:
    srv = pynbd_server("-v", "-D", "ip.rules=1", "--filter=ip", "memory", "1M",
                       "allow=10.0.0.0/8,anyunix", f"deny=uid:{os.getuid()}")
    assert "connect_error" not in probe(srv.uri)
    err = srv.stderr
    assert "ip: parsed allow=ipv4:10.0.0.0/8" in err
    assert f"ip: parsed deny=uid:{os.getuid()}" in err
    assert "ip: match source with allow=ipv4:10.0.0.0/8 => no" in err
    assert "ip: match source with allow=anyunix => yes" in err


def test_sources() -> None:
    v4 = _peer(ConnectionInfo(peer="('127.0.0.1', 40000)"))
    v6 = _peer(ConnectionInfo(peer="('fe80::1%lo', 40000, 0, 1)"))
    unix = _peer(ConnectionInfo(peer="", peer_pid=10, peer_uid=20, peer_gid=30))
    vsock = _peer(ConnectionInfo(peer="(2, 1234)"))
    assert v4 is not None and v4.family == socket.AF_INET
    assert v6 is not None and v6.family == socket.AF_INET6 and str(v6.address) == "fe80::1"
    assert unix is not None and (unix.pid, unix.uid, unix.gid) == (10, 20, 30)
    assert vsock is not None and (vsock.cid, vsock.port) == (2, 1234)
    assert _peer(ConnectionInfo(peer="")) is None
    f = IpFilter()
    f.config(None, "allow", "vsock-cid:2,vsock-port:99")
    f.config(None, "deny", "all")
    assert f.allowed(vsock)
    assert not f.allowed(v4)
    assert not f.allowed(None)  # a source we cannot know is refused when rules exist
    assert IpFilter().allowed(None)  # ... and let in when there are none


@pytest.mark.parametrize(("value", "message"), [
    ("127.0.0.1/33", "prefix is > 32 in allow=127.0.0.1/33"),
    ("::1/129", "prefix is > 128 in allow=::1/129"),
    ("1.2.3.4/" + "1" * 33, "allow: cannot parse prefix length: " + "1" * 33),
])
def test_bad_prefix(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _parse_rules("allow", value)
    assert str(e.value) == message
