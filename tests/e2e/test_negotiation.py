"""End-to-end negotiation: raw bytes against a real ``pynbd serve`` (spec §1.2, §4 rules 1-6, 22)."""

from __future__ import annotations

import struct
import time

import pytest
from rawclient import FIXED, NO_ZEROES, Hangup, RawClient

from pynbd.limits import MAX_OPTION_LENGTH, MAX_OPTION_ROUNDS
from pynbd.protocol import options as O
from pynbd.protocol.constants import (
    IHAVEOPT,
    OPT_HEADER,
    Cmd,
    Info,
    Opt,
    Rep,
    TxFlag,
)

MiB = 1 << 20


def info_of(replies: list) -> dict[int, O.InfoReply]:
    return {i.kind: i for i in (O.parse_info_reply(r.data) for r in replies if r.rep == Rep.INFO)}


# ---- framing ----------------------------------------------------------------------------------


def test_greeting_and_go(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        h = c.start()
        assert h == FIXED | NO_ZEROES
        replies = c.go("", (Info.NAME, Info.BLOCK_SIZE))
        assert replies[-1].rep == Rep.ACK
        infos = info_of(replies)
        assert infos[Info.EXPORT].size == MiB
        assert infos[Info.EXPORT].flags & TxFlag.HAS_FLAGS
        assert infos[Info.NAME].name == ""
        mn, pref, mx = infos[Info.BLOCK_SIZE].block_size
        assert mn == 1 and pref == 4096 and mx == 32 * MiB
        c.pwrite(512 * 1024, b"x" * 512)
        assert c.pread(512 * 1024, 512) == b"x" * 512


def test_bad_option_magic_hangs_up(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        c.send(OPT_HEADER.pack(0x1122334455667788, Opt.GO, 0))
        assert c.expect_hangup() == b""


def test_option_shorter_than_announced_then_close(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        c.send_option(Opt.INFO, b"\0\0", length=100)  # promise 100 bytes, send 2
        c.expect_silence(0.2)  # the server waits for the rest
        c.sock.shutdown(2)
    # the server survived: a new client works
    with RawClient(srv.sock) as c:
        c.negotiate()
        assert c.pread(0, 16) == bytes(16)


def test_option_length_over_limit_hangs_up(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        c.send_option(Opt.GO, b"", length=MAX_OPTION_LENGTH + 1)
        assert c.expect_hangup() == b""


def test_unknown_option_err_unsup_and_continue(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        for opt, data in ((0x1234, b"some data that must be consumed"), (Opt.PEEK_EXPORT, b""),
                          (0xFFFFFFFF, bytes(5000))):
            (r,) = c.option(opt, data)
            assert r.rep == Rep.ERR_UNSUP
            assert r.opt == opt
        assert c.go()[-1].rep == Rep.ACK
        assert c.pread(0, 4) == bytes(4)


@pytest.mark.parametrize("opt", [Opt.LIST, Opt.STRUCTURED_REPLY, Opt.EXTENDED_HEADERS,
                                 Opt.STARTTLS])
def test_no_data_options_with_data_err_invalid(shared, opt):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        (r,) = c.option(opt, b"junk")
        assert r.rep == Rep.ERR_INVALID
        # nothing was turned on: a plain GO gives simple replies
        assert c.go()[-1].rep == Rep.ACK
        r = c.cmd(Cmd.READ, 0, 8)
        assert r.simple and r.error == 0 and r.data == bytes(8)


@pytest.mark.parametrize("payload", [
    b"",                                            # shorter than 6
    b"\0\0\0",                                      # shorter than 6
    struct.pack(">I", 10) + b"ab" + b"\0\0",        # namelen > optlen - 6
    struct.pack(">I", 0) + struct.pack(">H", 2) + b"\0\0",         # fewer info types than n
    struct.pack(">I", 0) + struct.pack(">H", 0) + b"\0",           # trailing byte
    struct.pack(">I", 2) + b"a\0" + struct.pack(">H", 0),          # NUL in the name
    struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),     # not UTF-8
])
@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_info_go_malformed_err_invalid(shared, opt, payload):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        (r,) = c.option(opt, payload)
        assert r.rep == Rep.ERR_INVALID
        # negotiation continues
        assert c.go()[-1].rep == Rep.ACK


def test_info_go_unknown_export_err_unknown(shared):
    srv = shared(params=["exports=a,b"])
    with RawClient(srv.sock) as c:
        c.start()
        for opt in (Opt.INFO, Opt.GO):
            (r,) = c.option(opt, O.build_info_request("nosuch"))
            assert r.rep == Rep.ERR_UNKNOWN
        replies = c.go("b", (Info.NAME,))
        assert replies[-1].rep == Rep.ACK
        assert info_of(replies)[Info.NAME].name == "b"


def test_list(shared):
    srv = shared(params=["exports=a,b"])
    with RawClient(srv.sock) as c:
        c.start()
        replies = c.option(Opt.LIST)
        assert replies[-1].rep == Rep.ACK
        assert [O.parse_rep_server(r.data) for r in replies[:-1]] == [
            ("a", "export a"), ("b", "export b")]


def test_info_then_go_same_answer(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        c.structured_reply()
        a = c.go("", (Info.BLOCK_SIZE,), opt=Opt.INFO)
        b = c.go("", (Info.BLOCK_SIZE,))
        assert a[-1].rep == b[-1].rep == Rep.ACK
        assert [r.data for r in a] == [r.data for r in b]


def test_meta_context_before_sr_err_invalid(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        for opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            (r,) = c.option(opt, O.build_meta_request("", ["base:allocation"]))
            assert r.rep == Rep.ERR_INVALID
        assert c.go()[-1].rep == Rep.ACK


def test_list_meta_context_no_query_lists_base_allocation(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        c.structured_reply()
        replies = c.option(Opt.LIST_META_CONTEXT, O.build_meta_request("", []))
        assert replies[-1].rep == Rep.ACK
        names = [O.parse_rep_meta_context(r.data) for r in replies[:-1]]
        assert (0, "base:allocation") in names
        # "base:" lists the namespace; unknown namespaces are ignored, not errors
        replies = c.option(Opt.LIST_META_CONTEXT,
                           O.build_meta_request("", ["base:", "x-nosuch:thing"]))
        assert [O.parse_rep_meta_context(r.data) for r in replies[:-1]] == [(0, "base:allocation")]
        assert replies[-1].rep == Rep.ACK


@pytest.mark.parametrize("payload", [
    b"\0\0\0",                                               # too short
    struct.pack(">I", 9) + b"\0\0\0\0",                      # name overruns
    struct.pack(">II", 0, 1),                                # query missing
    struct.pack(">III", 0, 1, 50) + b"base:allocation",      # query overruns
    struct.pack(">II", 0, 0) + b"x",                         # trailing byte
])
def test_meta_context_malformed_err_invalid(shared, payload):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        c.structured_reply()
        for opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            (r,) = c.option(opt, payload)
            assert r.rep == Rep.ERR_INVALID


def test_set_meta_context_then_go_then_block_status(serve):
    srv = serve()
    with RawClient(srv.sock) as c:
        c.start()
        c.structured_reply()
        ids = c.set_meta(["base:allocation", "x-unknown:foo"])
        assert list(ids.values()) == ["base:allocation"]
        (ctx_id,) = ids
        assert c.go()[-1].rep == Rep.ACK
        c.pwrite(65536, b"d" * 4096)
        r = c.cmd(Cmd.BLOCK_STATUS, 0, 3 * 65536)
        assert r.error == 0
        (chunk,) = r.chunks
        assert chunk.type == 5 and chunk.context_id == ctx_id and chunk.done
        assert chunk.extents == [(65536, 3), (65536, 0), (65536, 3)]


def test_too_many_option_rounds_disconnects(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        for _ in range(MAX_OPTION_ROUNDS):
            (r,) = c.option(0x999)
            assert r.rep == Rep.ERR_UNSUP
        c.send_option(0x999)
        assert c.expect_hangup() == b""


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, FIXED | 1 << 5])
def test_unknown_client_flags_disconnect(shared, flags):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start(flags)
        assert c.expect_hangup() == b""


def test_client_flag_not_offered_disconnects(shared):
    srv = shared("--mask-handshake=1")  # FIXED_NEWSTYLE only
    with RawClient(srv.sock) as c:
        assert c.start(FIXED) == FIXED
    with RawClient(srv.sock) as c:
        c.start(FIXED | NO_ZEROES)
        assert c.expect_hangup() == b""


def test_non_fixed_newstyle_export_name(shared):
    srv = shared("--mask-handshake=0")
    with RawClient(srv.sock) as c:
        assert c.start(0) == 0
        size, eflags = c.export_name("", zeroes=True)
        assert size == MiB and eflags & TxFlag.HAS_FLAGS
        c.pwrite(512, b"abc")
        assert c.pread(512, 3) == b"abc"


def test_non_fixed_newstyle_other_option_disconnects(shared):
    srv = shared("--mask-handshake=0")
    with RawClient(srv.sock) as c:
        c.start(0)
        c.send_option(Opt.GO, O.build_info_request(""))
        assert c.expect_hangup() == b""


def test_oldstyle(shared):
    srv = shared("-o", size="64K")
    with RawClient(srv.sock) as c:
        size, flags = c.oldstyle_greeting()
        assert size == 65536
        assert flags & TxFlag.HAS_FLAGS and flags >> 16 == 0
        c.pwrite(0, b"old")
        assert c.pread(0, 3) == b"old"


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_no_zeroes(shared, no_zeroes):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start(FIXED | (NO_ZEROES if no_zeroes else 0))
        c.export_name("", zeroes=not no_zeroes)
        # the next bytes are the reply to our first request, not padding
        r = c.cmd(Cmd.READ, 0, 4)
        assert r.simple and r.error == 0 and r.data == bytes(4)


def test_export_name_unknown_export_disconnects(shared):
    srv = shared(params=["exports=a"])
    with RawClient(srv.sock) as c:
        c.start()
        c.send_option(Opt.EXPORT_NAME, b"nosuch")
        assert c.expect_hangup() == b""


def test_export_name_keeps_meta_contexts(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        c.structured_reply()
        (ctx_id,) = c.set_meta(["base:allocation"])
        c.export_name("", zeroes=False)
        r = c.cmd(Cmd.BLOCK_STATUS, 0, 4096)
        assert r.error == 0 and r.chunks[0].context_id == ctx_id


def test_export_name_after_extended_headers_disconnects(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        c.extended_headers()
        c.send_option(Opt.EXPORT_NAME, b"")
        assert c.expect_hangup() == b""


def test_abort_gets_ack(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        (r,) = c.option(Opt.ABORT, b"ignored data")
        assert r.rep == Rep.ACK and r.data == b""
        assert c.expect_hangup() == b""


def test_starttls_err_policy(shared):
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        (r,) = c.option(Opt.STARTTLS)
        assert r.rep == Rep.ERR_POLICY
        assert c.go()[-1].rep == Rep.ACK


def test_go_error_then_retry(shared):
    srv = shared(params=["exports=good"])
    with RawClient(srv.sock) as c:
        c.start()
        assert c.go("bad")[-1].rep == Rep.ERR_UNKNOWN
        assert c.go("good")[-1].rep == Rep.ACK
        assert c.pread(0, 8) == bytes(8)


def test_handshake_timeout_closes_silent_client(shared):
    srv = shared("--timeout=1")
    with RawClient(srv.sock) as c:
        t0 = time.monotonic()
        c.greeting()
        assert c.expect_hangup(timeout=5) == b""
        assert 0.5 < time.monotonic() - t0 < 4.5
    # an active client is not affected once in transmission
    with RawClient(srv.sock) as c:
        c.negotiate()
        time.sleep(1.3)
        assert c.pread(0, 4) == bytes(4)


def test_pipelined_option_bytes_and_requests_after_go(shared):
    """Bytes sent together with GO (the first requests) are not lost."""
    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        go = OPT_HEADER.pack(IHAVEOPT, Opt.GO, 6) + O.build_info_request("")
        off = 516 * 1024
        w, write = c.request(Cmd.WRITE, off, 4, payload=b"pipe", send=False)
        r, read = c.request(Cmd.READ, off, 4, send=False)
        c.send(go + write + read)
        while c.read_option_reply().rep != Rep.ACK:
            pass
        c.enter_transmission()
        a, b = c.read_reply(), c.read_reply()
        assert (a.cookie, a.error) == (w, 0)
        assert (b.cookie, b.error, b.data) == (r, 0, b"pipe")


def test_hangup_during_greeting_is_harmless(shared):
    srv = shared()
    for _ in range(3):
        c = RawClient(srv.sock)
        c.close()
    with RawClient(srv.sock) as c:
        c.start()
        c.send(b"\0\0")  # half an option header, then gone
    with RawClient(srv.sock) as c:
        c.negotiate()
        # an option header is not a request any more: bad request magic
        c.send(OPT_HEADER.pack(IHAVEOPT, 1, 0) + bytes(12))
        with pytest.raises(Hangup):
            c.read_reply()


def test_file_plugin_dir_unknown_export(pynbd_server, tmp_path):
    """The built-in file plugin in dir= mode: LIST shows the files, others are ERR_UNKNOWN."""
    pytest.importorskip("pynbd.plugins.file")
    (tmp_path / "disk1").write_bytes(b"1" * 4096)
    (tmp_path / "disk2").write_bytes(b"2" * 8192)
    srv = pynbd_server("file", f"dir={tmp_path}")
    with RawClient(srv.sock) as c:
        c.start()
        replies = c.option(Opt.LIST)
        assert replies[-1].rep == Rep.ACK
        assert sorted(O.parse_rep_server(r.data)[0] for r in replies[:-1]) == ["disk1", "disk2"]
        for opt in (Opt.INFO, Opt.GO):
            (r,) = c.option(opt, O.build_info_request("nosuch"))
            assert r.rep == Rep.ERR_UNKNOWN
        (r,) = c.option(Opt.INFO, O.build_info_request("../etc"))
        assert r.is_error
        replies = c.go("disk2")
        assert replies[-1].rep == Rep.ACK
        assert info_of(replies)[Info.EXPORT].size == 8192
        assert c.pread(4096, 4) == b"2222"


def test_long_strings_and_too_many_queries(shared):
    from pynbd.limits import MAX_META_QUERIES, MAX_STRING

    srv = shared()
    with RawClient(srv.sock) as c:
        c.start()
        c.structured_reply()
        (r,) = c.option(Opt.INFO, O.build_info_request("n" * (MAX_STRING + 1)))
        assert r.rep == Rep.ERR_INVALID
        (r,) = c.option(Opt.LIST_META_CONTEXT,
                        O.build_meta_request("", ["base:allocation"] * (MAX_META_QUERIES + 1)))
        assert r.rep == Rep.ERR_TOO_BIG
        (r,) = c.option(Opt.SET_META_CONTEXT, O.build_meta_request("", ["x:" + "q" * MAX_STRING]))
        assert r.rep == Rep.ERR_INVALID
        assert c.go()[-1].rep == Rep.ACK
    with RawClient(srv.sock) as c:  # EXPORT_NAME cannot answer: it hangs up
        c.start()
        c.send_option(Opt.EXPORT_NAME, b"n" * (MAX_STRING + 1))
        assert c.expect_hangup() == b""
