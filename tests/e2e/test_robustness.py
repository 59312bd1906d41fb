"""A misbehaving plugin or client never takes the server down; shutdown is clean (§4 rules 19-21)."""

from __future__ import annotations

import signal
import time

from rawclient import RawClient

from pynbd.protocol import options as O
from pynbd.protocol.constants import IHAVEOPT, OPT_HEADER, Cmd, Opt, Rep
from pynbd.protocol.transmission import build_request


def test_plugin_open_raising_is_err_unknown_and_server_lives(serve):
    srv = serve(params=["boom_export=boom"])
    with RawClient(srv.sock) as c:
        c.start()
        for opt in (Opt.INFO, Opt.GO):
            (r,) = c.option(opt, O.build_info_request("boom"))
            assert r.rep == Rep.ERR_UNKNOWN
            assert b"boom in open" in r.data
        assert c.go("fine")[-1].rep == Rep.ACK
        assert c.pread(0, 4) == bytes(4)
    with RawClient(srv.sock) as c:  # EXPORT_NAME can only hang up
        c.start()
        c.send_option(Opt.EXPORT_NAME, b"boom")
        assert c.expect_hangup() == b""
    with RawClient(srv.sock) as c:
        c.negotiate()
        assert c.pread(0, 4) == bytes(4)
    assert "boom in open" in srv.stderr


def test_plugin_list_exports_raising_is_err_platform(serve):
    srv = serve(params=["boom_list=1"])
    with RawClient(srv.sock) as c:
        c.start()
        (r,) = c.option(Opt.LIST)
        assert r.rep == Rep.ERR_PLATFORM
        assert c.go()[-1].rep == Rep.ACK


def test_plugin_pread_raising_is_eio_and_connection_lives(serve):
    """A plugin's bug while serving: EIO for the client, ONE log line (plugin, command,
    error) without a traceback; a result that is not the data asked for: the same."""
    for blocking in (False, True):
        srv = serve(params=["boom_read=4096", "bad_read=8192"], blocking=blocking)
        for structured in (False, True):
            with RawClient(srv.sock) as c:
                c.negotiate(structured=structured)
                for off in (4096, 8192):
                    r = c.cmd(Cmd.READ, off, 512)
                    assert r.error == 5 and r.data == b""
                    assert r.simple != structured
                assert c.pread(0, 512) == bytes(512)
        lines = srv.stderr.splitlines()
        assert "Traceback" not in srv.stderr
        boom = [ln for ln in lines if "boom in pread" in ln]
        assert len(boom) == 2, lines  # once per connection
        assert all(": e2e: read: RuntimeError: boom in pread" in ln for ln in boom), boom
        bad = [ln for ln in lines if "for a read of 512 bytes" in ln]
        assert len(bad) == 2 and all("e2e: pread returned NoneType" in ln for ln in bad), lines
        assert len(lines) == 4, lines


def test_plugin_exception_traceback_with_verbose(serve):
    """With -v (debug logging) the same failure also logs the plugin's traceback."""
    srv = serve("-v", params=["boom_read=4096"], tracebacks_ok=True)
    with RawClient(srv.sock) as c:
        c.negotiate()
        assert c.cmd(Cmd.READ, 4096, 512).error == 5
        assert c.pread(0, 512) == bytes(512)
    err = srv.stderr
    assert "e2e: read: RuntimeError: boom in pread" in err
    assert "Traceback" in err and 'raise RuntimeError("boom in pread")' in err


def test_plugin_open_failure_is_one_line_naming_the_plugin(serve):
    """A plugin failing in open: NBD_REP_ERR_UNKNOWN (as nbdkit) and one log line saying
    what failed in which plugin; an errno the plugin meant (no such export) logs nothing."""
    srv = serve(params=["boom_export=boom", "exports=a"])
    with RawClient(srv.sock) as c:
        c.start()
        (r,) = c.option(Opt.GO, O.build_info_request("boom"))
        assert r.rep == Rep.ERR_UNKNOWN and b"RuntimeError" not in r.data
        (r,) = c.option(Opt.GO, O.build_info_request("nosuch"))
        assert r.rep == Rep.ERR_UNKNOWN
    lines = srv.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "e2e: opening export 'boom': RuntimeError: boom in open" in lines[0]


def test_bad_magic_right_after_go_hangs_up(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        go = OPT_HEADER.pack(IHAVEOPT, Opt.GO, 6) + O.build_info_request("")
        c.send(go + b"\xde\xad\xbe\xef" + bytes(24))  # pipelined with GO: bad request magic
        while c.read_option_reply().rep != Rep.ACK:
            pass
        assert c.expect_hangup() == b""


def test_sigterm_with_clients_connected_exits_cleanly(serve):
    srv = serve(blocking=True)
    negotiating = RawClient(srv.sock)
    negotiating.start()
    idle = RawClient(srv.sock)
    idle.negotiate()
    busy = RawClient(srv.sock)
    busy.negotiate(structured=True)
    busy.pwrite(0, b"z" * 4096)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(8)
    elapsed = time.monotonic() - t0
    assert rc == 0
    assert elapsed < 3, f"took {elapsed:.1f}s to exit"
    for c in (negotiating, idle, busy):
        assert c.expect_hangup() == b""
        c.close()
    err = srv.stderr
    assert "Traceback" not in err and "Exception" not in err, err


def test_server_survives_many_abrupt_clients(shared):
    srv = shared()
    for i in range(20):
        c = RawClient(srv.sock)
        if i % 4:
            c.start()
        if i % 4 == 2:
            c.send(OPT_HEADER.pack(IHAVEOPT, Opt.GO, 6) + O.build_info_request(""))
        if i % 4 == 3:
            c.send(OPT_HEADER.pack(IHAVEOPT, Opt.GO, 6) + O.build_info_request(""))
            while c.read_option_reply().rep != Rep.ACK:
                pass
            c.send(build_request(Cmd.WRITE, 1, 0, 4096)[:20])  # half a header
        c.close()
    with RawClient(srv.sock) as c:
        c.negotiate()
        assert c.pread(0, 8) == bytes(8)


def test_oldstyle_open_failure_hangs_up_quietly(serve):
    srv = serve("-o", params=["boom_export="])  # opening the default export "" raises
    with RawClient(srv.sock) as c:
        assert c.expect_hangup() == b""
    assert "boom in open" in srv.stderr


def test_sigterm_finishes_in_flight_request(serve):
    slow = 4096
    srv = serve(blocking=True, params=[f"slow={slow}", "delay=0.7"])
    c = RawClient(srv.sock)
    c.negotiate()
    cookie, _ = c.request(Cmd.READ, slow, 512)
    time.sleep(0.2)  # the read is in the plugin now
    srv.proc.send_signal(signal.SIGTERM)
    r = c.read_reply()
    assert (r.cookie, r.error, r.data) == (cookie, 0, bytes(512))
    assert c.expect_hangup() == b""
    c.close()
    assert srv.proc.wait(5) == 0
    assert "Traceback" not in srv.stderr
