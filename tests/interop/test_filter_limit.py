"""The limit filter side by side with nbdkit's: the client over the limit is turned away
before it negotiates, or when it opens an export after negotiating slowly."""

from __future__ import annotations

import pytest
from side_by_side import probe

from pynbd.client import Client
from pynbd.errors import OptionError
from tests.interop.behaviour_compare import bad_params, wait_until


def _served(uri: str) -> dict | None:
    """A client's view of one read, or None if it was turned away."""
    view = probe(uri, [("pread", 512, 0)])
    return None if "connect_error" in view else view


def _clients(factory, params: list[str], n: int) -> list[Client]:
    srv = factory("--filter=limit", "memory", "1M", *params)
    return srv, [Client.connect(srv.uri) for _ in range(n)]


@pytest.mark.parametrize(("params", "held"), [([], 1), (["limit=2"], 2), (["limit=0"], 5)])
def test_over_the_limit(pynbd_server, nbdkit_server, params: list[str], held: int) -> None:
    outcomes = []
    for factory in (pynbd_server, nbdkit_server):
        srv, clients = _clients(factory, params, held)
        over = probe(srv.uri, [("pread", 512, 0)])
        for c in clients:
            c.close()
        after = wait_until("a client let in again", lambda uri=srv.uri: _served(uri))
        # refused: the server hangs up before the greeting (libnbd's errno for that
        # depends on when it notices)
        outcomes.append(("connect_error" in over, "connect_error" in after,
                         after.get("results")))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == (params != ["limit=0"], False, [["data", bytes(512)]])


def test_slow_negotiation_is_checked_again(pynbd_server, nbdkit_server):
    """A client let in before the limit was reached is refused when it opens the export."""
    for factory in (pynbd_server, nbdkit_server):
        srv = factory("--filter=limit", "memory", "1M")
        slow = Client.connect(srv.uri, opt_mode=True)  # past preconnect, nothing open
        first = Client.connect(srv.uri)
        with pytest.raises(OptionError):  # the export cannot be opened
            slow.opt_go()
        slow.close()
        first.close()
        # once the server has seen the first client go, a new one gets in
        wait_until("a client let in again", lambda uri=srv.uri: _served(uri))


def test_bad_parameters():
    bad_params([["--filter=limit", "memory", "1M", "limit=x"],
                ["--filter=limit", "memory", "1M", "limit=-1"],
                ["--filter=limit", "memory", "1M", "limit=1.5"]])
