"""The nocache filter side by side with nbdkit's: the cache flag, and what a cache request
becomes at the plugin (calls.py records every call)."""

from __future__ import annotations

from tests.interop.behaviour_compare import CALLS, MIB, assert_same_many, bad_params, calls_log

OPS = [("cache", 8192, 4096), ("pread", 512, 0), ("pread", 4096, MIB)]


def test_modes(pynbd_server, nbdkit_server):
    modes = ["", "cachemode=none", "cachemode=emulate", "cachemode=nop", "cachemode=no-op"]
    cases = [(["--filter=nocache", "python", CALLS, *([m] if m else [])], OPS) for m in modes]
    cases.append((["--filter=nocache", "memory", "1M", "cachemode=emulate"],
                  [("cache", 4096, 0), ("pread", 512, 0)]))
    views = dict(zip(modes, assert_same_many(pynbd_server, nbdkit_server, cases),
                     strict=False))
    assert views[""]["flags"]["can_cache"] is False
    assert views[""]["results"][0] == ["error", 22]  # refused by the client: not offered
    assert calls_log(views["cachemode=emulate"])[0] == "pread 8192 4096 0 memoryview False"
    assert calls_log(views["cachemode=nop"])[0] == "pread 512 0 0 memoryview False"
    assert views["cachemode=nop"]["flags"]["can_cache"] is True


def test_bad_parameters():
    bad_params([["--filter=nocache", "memory", "1M", "cachemode=x"],
                ["--filter=nocache", "memory", "1M", "cachemode=native"]])
