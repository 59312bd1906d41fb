"""The fua filter side by side with nbdkit's: flags, what the plugin is asked (calls.py
records each call with its flags), refused connections, parameters."""

from __future__ import annotations

from side_by_side import probe

from tests.interop.behaviour_compare import CALLS, MIB, assert_same_many, bad_params, calls_log

FUA = 1
RECORD = ("pread", 4096, MIB)
OPS = [("pwrite", b"\1" * 4096, 0), ("pwrite", b"\2" * 4096, 4096, FUA),
       ("trim", 4096, 8192, FUA), ("zero", 4096, 12288, FUA), ("flush",),
       ("pread", 16384, 0), RECORD]


def test_modes(pynbd_server, nbdkit_server):
    modes = ["", "fuamode=emulate", "fuamode=native", "fuamode=force", "fuamode=pass",
             "fuamode=discard"]
    cases = [(["--filter=fua", "python", CALLS, *([m] if m else [])],
              OPS if m else [op for op in OPS if len(op) < 4 or op[3] != FUA])
             for m in modes]
    views = dict(zip(modes, assert_same_many(pynbd_server, nbdkit_server, cases),
                     strict=True))
    assert views[""]["flags"]["can_fua"] is False
    assert calls_log(views["fuamode=emulate"])[:3] == [
        "pwrite 4096 0 0 memoryview True", "pwrite 4096 4096 0 memoryview True", "flush 0"]
    force = calls_log(views["fuamode=force"])
    assert force[0] == "pwrite 4096 0 2 memoryview True" and "flush 0" not in force
    discard = calls_log(views["fuamode=discard"])
    assert "pwrite 4096 4096 0 memoryview True" in discard and "flush 0" not in discard
    assert "pwrite 4096 4096 2 memoryview True" in calls_log(views["fuamode=pass"])


def test_plugin_without_flush_or_fua(pynbd_server, nbdkit_server):
    """emulate needs the plugin's flush, native and force its FUA, when the client may
    write; force and discard offer a flush the plugin does not have."""
    cases = [(["--filter=fua", "pattern", "1M", f"fuamode={m}"], [("pread", 512, 0)])
             for m in ("emulate", "native", "force")]
    cases += [(["--filter=fua", "memory", "1M", "fuamode=discard"],
               [("pwrite", b"\1" * 512, 0, FUA), ("flush",), ("pread", 512, 0)]),
              (["-r", "--filter=fua", "pattern", "1M", "fuamode=force"], [("flush",)]),
              (["-r", "--filter=fua", "pattern", "1M", "fuamode=emulate"], [("flush",)])]
    views = assert_same_many(pynbd_server, nbdkit_server, cases)
    assert [v.get("connect_error") for v in views[:3]] == [2, 2, 2]
    assert [v["flags"]["can_flush"] for v in views[-2:]] == [True, False]


def test_none_can_be_given(pynbd_server):
    """fuamode=none, the default, can be given: nbdkit 1.32 refuses its own default
    ("unknown fuamode 'none'", a missing else in its parser)."""
    view = probe(pynbd_server("--filter=fua", "python", CALLS, "fuamode=none").uri,
                 [("pwrite", b"\1" * 512, 0), ("flush",), RECORD])
    assert view["flags"]["can_fua"] is False and view["flags"]["can_flush"] is True
    assert calls_log(view)[:2] == ["pwrite 512 0 0 memoryview True", "flush 0"]


def test_bad_parameters():
    bad_params([["--filter=fua", "memory", "1M", "fuamode=x"],
                ["--filter=fua", "memory", "1M", "fuamode=Native"]])
