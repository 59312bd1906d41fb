"""The exitlast filter side by side with nbdkit's: the server exits when its last client
has gone, not before its first."""

from __future__ import annotations

from side_by_side import probe

from pynbd.client import Client


def test_exits_after_the_last_client(pynbd_server, nbdkit_server):
    for factory in (pynbd_server, nbdkit_server):
        srv = factory("--filter=exitlast", "memory", "1M")
        first = Client.connect(srv.uri)
        second = Client.connect(srv.uri)
        first.close()
        # one client left: the server still serves it, and others
        assert second.pread(512, 0) == bytes(512)
        assert probe(srv.uri, [("pread", 512, 0)])["results"] == [["data", bytes(512)]]
        assert srv.proc.poll() is None
        second.close()
        assert srv.proc.wait(30) == 0, srv.stderr


def test_a_client_asking_for_information_counts(pynbd_server, nbdkit_server):
    """NBD_OPT_INFO opens and closes the export: the server exits after it (once the
    client, still negotiating, has gone: nbdkit waits for it; the pynbd server ends a
    negotiation when it shuts down)."""
    for factory in (pynbd_server, nbdkit_server):
        srv = factory("--filter=exitlast", "memory", "1M")
        c = Client.connect(srv.uri, opt_mode=True)
        assert c.opt_info("").size == 1 << 20
        c.close()
        assert srv.proc.wait(30) == 0, srv.stderr
