"""The eval plugin's own side: the method scripts it writes to $tmpdir, the can_* it adds,
missing=, and its --dump-plugin answers (asked directly). nbdkit side by side is in
tests/interop/test_plugin_eval.py."""

from __future__ import annotations

import os
import stat

import pytest

import pynbd.libnbd as nbd
from pynbd.errors import ConfigError
from pynbd.plugin import CALLBACKS, ThreadModel
from pynbd.plugins.eval import METHODS, EvalPlugin


def configured(*params: str, complete: bool = True) -> EvalPlugin:
    p = EvalPlugin()
    p.load()
    try:
        for kv in params:
            k, _, v = kv.partition("=")
            p.config(k, v)
        if complete:
            p.config_complete()
    except BaseException:
        p.unload()
        raise
    return p


def scripts(p: EvalPlugin) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(p.tmpdir)):
        path = os.path.join(p.tmpdir, name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o500, name
        with open(path) as f:
            out[name] = f.read()
    return out


def test_methods_are_written_to_tmpdir() -> None:
    p = configured("get_size=echo 1M", "pread=dd if=/dev/zero count=$3 iflag=count_bytes",
                   complete=False)
    try:
        assert scripts(p) == {"get_size": "echo 1M",
                              "pread": "dd if=/dev/zero count=$3 iflag=count_bytes",
                              "missing": "exit 2\n"}
        assert p.script("get_size") == os.path.join(p.tmpdir, "get_size")
        assert p.script("can_write") == os.path.join(p.tmpdir, "missing")
    finally:
        p.unload()
    assert not os.path.exists(p.tmpdir)


def test_can_methods_added_at_config_complete() -> None:
    p = configured("get_size=echo 1M", "pwrite=cat", "flush=sync", "trim=:", "zero=:",
                   "extents=echo 0 1M", "cache=:", "can_zero=exit 3")
    try:
        got = scripts(p)
        for can in ("can_write", "can_flush", "can_trim", "can_extents"):
            assert got[can] == "exit 0\n", can
        assert got["can_cache"] == "echo native\n"
        assert got["can_zero"] == "exit 3"  # given: kept
        assert "can_fua" not in got and "can_fast_zero" not in got
    finally:
        p.unload()


def test_missing_replaces_the_default() -> None:
    p = configured("missing=echo EPERM no >&2; exit 1", complete=False)
    try:
        assert scripts(p) == {"missing": "echo EPERM no >&2; exit 1"}
        with pytest.raises(ConfigError, match="missing: no$"):
            p.config_complete()  # config_complete is missing too: it runs missing=
    finally:
        p.unload()


@pytest.mark.parametrize("params,message", [
    (["get_size=a", "get_size=b"], "method get_size defined more than once on the command line"),
    (["missing=a", "missing=b"], "method missing defined more than once on the command line"),
    (["x=1"], "callback 'x' is unknown, and there is no 'config' callback to handle it"),
    (["load=exit 0"], "callback 'load' is unknown"),
])
def test_refused_parameters(params, message) -> None:
    with pytest.raises(ConfigError, match=message):
        configured(*params, complete=False)


def test_other_keys_go_to_config_in_order(tmp_path) -> None:
    log = tmp_path / "cfg"
    p = configured(f'config=echo "$1 $2 $3" >> {log}', "a=1", "b=two words", "get_size=echo 1")
    try:
        assert log.read_text() == "config a 1\nconfig b two words\n"
    finally:
        p.unload()


def test_callbacks_and_dump_without_methods() -> None:
    p = configured(complete=False)
    try:
        assert p.callbacks() == frozenset(CALLBACKS) - {"cleanup"}
        assert p.dump_plugin() == ["max_known_status=3"]
        # Every method is a script here ("exit 2"): the safe model, as nbdkit's eval says.
        assert p.get_thread_model() == ThreadModel.SERIALIZE_ALL_REQUESTS
    finally:
        p.unload()


def test_dump_plugin_lines() -> None:
    p = configured("dump_plugin=echo a=1; echo b=2", "thread_model=echo serialize_requests",
                   complete=False)
    try:
        assert p.dump_plugin() == ["max_known_status=3", "a=1", "b=2"]
        assert p.get_thread_model() == ThreadModel.SERIALIZE_REQUESTS
    finally:
        p.unload()


def test_served(pynbd_server, tmp_path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(65536))
    srv = pynbd_server(
        "eval", f"get_size=stat -c %s {disk}",
        f"pread=dd if={disk} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        f"pwrite=dd of={disk} seek=$4 conv=notrunc oflag=seek_bytes status=none",
        "can_multi_conn=exit 0", "thread_model=echo parallel")
    h = nbd.NBD()
    h.connect_unix(srv.sock)
    assert h.get_size() == 65536 and h.can_multi_conn() and not h.is_read_only()
    h.pwrite(b"eval" * 128, 1024)
    assert h.pread(512, 1024) == b"eval" * 128
    h.zero(512, 1024)  # no zero method: written as zeroes through pwrite
    assert h.pread(512, 1024) == bytes(512)
    h.shutdown()
    assert disk.read_bytes() == bytes(65536)


def test_method_keys_are_the_manual_pages() -> None:
    """nbdkit-eval-plugin(1)'s PARAMETERS: every callback but load, plus missing."""
    assert frozenset(CALLBACKS) - METHODS == {"load", "config_help", "cleanup"}
    assert METHODS - frozenset(CALLBACKS) == {"missing"}
