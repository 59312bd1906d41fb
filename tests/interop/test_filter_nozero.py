"""The nozero filter side by side with nbdkit's: what the plugin is asked (calls.py records
every call with its flags), the flags a client sees, failures, parameters."""

from __future__ import annotations

from side_by_side import assert_same, probe, serve_both

from tests.interop.behaviour_compare import CALLS, MIB, assert_same_many, bad_params, calls_log

FUA, NO_HOLE, FAST_ZERO = 1, 2, 16
RECORD = ("pread", 4096, MIB)
#: zero with MAY_TRIM, without (NO_HOLE), with FUA, fast; then the data and the record.
ZEROES = [("pwrite", b"\1" * 12288, 0), ("zero", 4096, 0), ("zero", 4096, 4096, NO_HOLE),
          ("zero", 4096, 8192, FUA), ("zero", 4096, 0, FAST_ZERO), ("pread", 12288, 0),
          RECORD]


def test_modes(pynbd_server, nbdkit_server):
    cases = [(["--filter=nozero", "python", CALLS, f"zeromode={z}", f"fastzeromode={f}"],
              ZEROES)
             for z in ("emulate", "notrim", "plugin")
             for f in ("default", "none", "slow", "ignore")
             if (z, f) != ("emulate", "ignore")]  # see test_emulate_ignore
    views = assert_same_many(pynbd_server, nbdkit_server, cases)
    by_mode = {tuple(a[3:]): v for (a, _), v in zip(cases, views, strict=True)}
    emulate = by_mode[("zeromode=emulate", "fastzeromode=default")]
    # emulate: every zero is written by the filter, FUA kept (the plugin's FUA is native),
    # and the fast zero fails at once
    assert calls_log(emulate)[1:4] == ["pwrite 4096 0 0 memoryview True",
                                       "pwrite 4096 4096 0 memoryview True",
                                       "pwrite 4096 8192 2 memoryview True"]
    assert emulate["results"][4] == ["error", 95]
    assert emulate["results"][5] == ["data", bytes(12288)]
    notrim = calls_log(by_mode[("zeromode=notrim", "fastzeromode=default")])
    assert "zero 4096 0 1" not in notrim and "zero 4096 0 0" in notrim  # MAY_TRIM dropped
    plugin = by_mode[("zeromode=plugin", "fastzeromode=none")]
    assert plugin["flags"]["can_fast_zero"] is False
    assert "zero 4096 0 1" in calls_log(plugin)


def test_emulate_ignore(pynbd_server):
    """zeromode=emulate fastzeromode=ignore: a fast zero is written like any other, as the
    manual says. nbdkit 1.32 fails it with ENOTSUP instead: it emulates zeroes in its
    server, which knows nothing of fastzeromode."""
    srv = pynbd_server("--filter=nozero", "python", CALLS, "zeromode=emulate",
                       "fastzeromode=ignore")
    view = probe(srv.uri, ZEROES)
    assert view["flags"]["can_fast_zero"] is True
    assert view["results"][4] == ["ok"]
    assert calls_log(view)[-2] == "pwrite 4096 0 0 memoryview True"


def test_fua_emulated_below(pynbd_server, nbdkit_server):
    """Zeroes written over a layer whose FUA is emulated: FUA on the (last) write becomes a
    flush after it."""
    assert_same(pynbd_server, nbdkit_server, [
        "--filter=nozero", "--filter=fua", "python", CALLS, "zeromode=emulate",
        "fuamode=emulate"], ZEROES)


def test_large_zero_is_written_in_64m_pieces(pynbd_server, nbdkit_server):
    args = ["--filter=nozero", "--filter=nozero", "memory", "200M", "zeromode=emulate"]
    ops = [("pwrite", b"\7" * 4096, 140 << 20), ("zero", 150 << 20, 0),
           ("pread", 8192, (140 << 20) - 4096)]
    view = assert_same(pynbd_server, nbdkit_server, args, ops)
    assert view["results"][2] == ["data", bytes(8192)]


def test_default_mode(pynbd_server, nbdkit_server):
    """zeromode=none (the default): WRITE_ZEROES is no longer offered; a client writes its
    zeroes as data, which reach the plugin as writes."""
    ops = [("pwrite", bytes(4096), 0), ("pread", 4096, 0), RECORD]
    p, n = serve_both(pynbd_server, nbdkit_server, ["--filter=nozero", "python", CALLS])
    got, want = probe(p.uri, ops), probe(n.uri, ops)
    assert got["results"] == want["results"]
    assert got["flags"] == want["flags"]
    assert (got["flags"]["can_zero"], got["flags"]["can_fast_zero"]) == (False, False)
    assert calls_log(got)[-2] == "pwrite 4096 0 0 memoryview True"


def test_default_mode_flags(pynbd_server, nbdkit_server):
    assert_same(pynbd_server, nbdkit_server, ["--filter=nozero", "memory", "1M"])


def test_mode_needs_plugin_zero(pynbd_server, nbdkit_server):
    """notrim and plugin need the plugin's zero, for a client that may write (pattern is
    read-only but the export is not): the client's open fails the same way. (The message
    is checked in tests/e2e/test_filter_nozero.py: libnbd does not show it.)"""
    cases = [(["--filter=nozero", "pattern", "1M", f"zeromode={m}"], [("pread", 512, 0)])
             for m in ("notrim", "plugin")]
    cases += [(["-r", "--filter=nozero", "pattern", "1M", f"zeromode={m}"],
               [("pread", 512, 0)]) for m in ("notrim", "plugin")]
    views = assert_same_many(pynbd_server, nbdkit_server, cases)
    assert [v.get("connect_error") for v in views] == [2, 2, None, None]


def test_bad_parameters():
    bad_params([["--filter=nozero", "memory", "1M", "zeromode=x"],
                ["--filter=nozero", "memory", "1M", "zeromode=NONE"],
                ["--filter=nozero", "memory", "1M", "fastzeromode=fast"]])
