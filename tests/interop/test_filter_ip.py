"""The ip filter side by side with nbdkit's, over a Unix socket and over TCP: which clients
are let in, and the messages for bad rules. (IP address rules are tested against pynbd
alone in tests/e2e/test_filter_ip.py: nbdkit 1.32 as built here cannot read addresses.)"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from side_by_side import probe

from tests.interop.behaviour_compare import bad_params

UID, GID = os.getuid(), os.getgid()

UNIX = [
    ([], True),
    (["deny=ANY"], False),
    (["deny=allunix", "allow=anyunix"], True),
    (["allow=anyipv4,anyipv6,anyvsock", "deny=all"], False),
    ([f"allow=uid:{UID}", "deny=all"], True),
    ([f"allow=gid:{GID}", "deny=all"], True),
    ([f"allow=UID:{UID + 1}", f"deny=GID:{GID}"], False),
    (["allow=pid:1", "deny=all"], False),
    (["allow=", "deny=all"], False),
]

TCP = [
    (["deny=anyipv4"], False),
    (["allow=anyipv4", "deny=all"], True),
    (["allow=allipv6", "deny=all"], False),
    ([f"deny=anyunix,uid:{UID}"], True),
]


def _let_in(factory, params: list[str], tcp: bool) -> bool:
    srv = factory("--filter=ip", "memory", "1M", *params, tcp=tcp)
    view = probe(srv.uri, [("pread", 512, 0)])
    if "connect_error" in view:
        return False
    assert view["results"] == [["data", bytes(512)]]
    return True


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_who_is_let_in(pynbd_server, nbdkit_server, tcp: bool) -> None:
    cases = TCP if tcp else UNIX
    with ThreadPoolExecutor(4) as pool:
        mine = list(pool.map(lambda c: _let_in(pynbd_server, c[0], tcp), cases))
        theirs = list(pool.map(lambda c: _let_in(nbdkit_server, c[0], tcp), cases))
    want = [w for _, w in cases]
    assert theirs == want
    assert mine == want


def test_refused_client_is_logged(pynbd_server):
    srv = pynbd_server("--filter=ip", "memory", "1M", "deny=all")
    assert "connect_error" in probe(srv.uri)
    assert "client not permitted to connect because of source address restriction" in \
        srv.stderr


def test_bad_parameters():
    bad_params([["--filter=ip", "memory", "1M", f"allow={rule}"] for rule in (
        "foo", ",", "a,,b", "pid:0", "pid:x", "pid:10x", "uid:-1", "uid:", "gid:-5",
        "vsock-cid:-1", "vsock-port:4294967296", "1.2.3.4/x", "1.2.3.4/8/9", "/8",
        "1.2.3.4/", "1.2.3", "01.2.3.4", "fe80::1%lo", " 127.0.0.1")])
