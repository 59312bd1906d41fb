"""The python plugin's adapter and the ``nbdkit`` module, in this process: nbdkit's rules for
results of the wrong shape, defaults, set_error, and the module's helper functions.

(What a client sees is tested against nbdkit itself in tests/interop/test_plugin_python*.)
"""

from __future__ import annotations

import errno
import logging
import os
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pynbd.errors import CommandError
from pynbd.plugin import CacheMode, FuaMode
from pynbd.plugins import _nbdkit_module as nbdkit
from pynbd.plugins.python import PythonPlugin

HEAD = """\
import errno
import nbdkit
API_VERSION = 2
def open(readonly): return {"ro": readonly}
def get_size(h): return 1 << 20
def pread(h, buf, offset, flags): buf[:] = bytes(len(buf))
"""


@pytest.fixture
def load(tmp_path: Path) -> Iterator[Callable[..., PythonPlugin]]:
    """load(text, *params): a PythonPlugin running the script ``text``."""
    plugins = []

    def make(text: str, *params: str) -> PythonPlugin:
        path = tmp_path / f"plugin{len(plugins)}.py"
        path.write_text(textwrap.dedent(text))
        p = PythonPlugin()
        plugins.append(p)
        p.load()
        p.config("script", str(path))
        for kv in params:
            k, _, v = kv.partition("=")
            p.config(k, v)
        p.config_complete()
        return p

    yield make
    for p in reversed(plugins):
        p.unload()


def fails(fn: Callable[..., object], *args: object) -> CommandError:
    with pytest.raises(CommandError) as e:
        fn(*args)
    return e.value


# ---- capabilities ----------------------------------------------------------------------


def test_defaults_follow_the_data_callbacks(load):
    p = load(HEAD + "def pwrite(h, b, o, f): pass\ndef flush(h, f): pass\n"
                    "def cache(h, c, o, f): pass\ndef zero(h, c, o, f): pass\n")
    h = p.open(False, "", False)
    assert p.can_write(h) and p.can_flush(h) and p.can_zero(h)
    assert not p.can_trim(h) and not p.can_extents(h)
    assert not p.can_fast_zero(h)  # zero exists
    assert not p.is_rotational(h) and not p.can_multi_conn(h)
    assert p.can_fua(h) == FuaMode.EMULATE and p.can_cache(h) == CacheMode.NATIVE
    bare = load(HEAD)
    h = bare.open(True, "", False)
    assert not bare.can_write(h) and bare.can_fast_zero(h)
    assert bare.can_fua(h) == FuaMode.NONE and bare.can_cache(h) == CacheMode.NONE
    assert bare.block_size(h) is None and bare.export_description(h) is None
    assert bare.list_exports(False, False) is None and bare.default_export(False, False) == ""
    assert bare.extents(h, 4096, 512, 0) == [(512, 4096, 0)]


@pytest.mark.parametrize("value, expected", [
    ("True", True), ("1", False), ("'yes'", False), ("None", False), ("False", False),
    ("[1]", False), ("(1 == 1)", True),
])
def test_booleans_count_only_if_exactly_true(load, value, expected):
    names = ("can_write", "can_flush", "can_trim", "can_zero", "can_fast_zero", "can_extents",
             "is_rotational", "can_multi_conn")
    p = load(HEAD + "".join(f"def {n}(h): return {value}\n" for n in names))
    h = p.open(False, "", False)
    assert [getattr(p, n)(h) for n in names] == [expected] * len(names)


def test_can_zero_is_asked_once_per_handle(load):
    p = load(HEAD + "asked = []\ndef can_zero(h): asked.append(1); return True\n")
    h = p.open(False, "", False)
    assert p.can_zero(h) and p.can_zero(h) and not p.can_fast_zero(h)
    assert p._ns["asked"] == [1]


def test_callbacks_are_looked_up_on_every_call(load):
    p = load(HEAD + "def config(k, v): globals()[k] = lambda h: True\ntrim = 'not callable'\n",
             "can_trim=x")
    h = p.open(False, "", False)
    assert p.can_trim(h)
    p._ns["can_trim"] = "not callable either"
    assert not p.can_trim(h)  # a non-callable attribute is no callback


# ---- results of the wrong shape --------------------------------------------------------


def test_v1_pread_results(load):
    p = load("""\
        def open(readonly): return 1
        def get_size(h): return 1 << 20
        def pread(h, count, offset):
            if offset == 0: return b"x" * (count + 5)
            if offset == 512: return memoryview(bytearray(b"y" * count))
            if offset == 1024: return 42
            return b"short"
        """)
    h = p.open(False, "", False)
    assert p.pread(h, 10, 0, 0) == b"x" * 10
    assert p.pread(h, 10, 512, 0) == b"y" * 10
    e = fails(p.pread, h, 10, 1024, 0)
    assert e.errno == errno.EIO and "does not support the buffer protocol" in e.message
    assert "buffer returned from pread is too small" in fails(p.pread, h, 10, 2048, 0).message


def test_v2_buffers(load):
    p = load(HEAD.replace("def pread(h, buf, offset, flags): buf[:] = bytes(len(buf))", """\
def pread(h, buf, offset, flags):
    global kept
    kept = buf
    buf[:] = b"r" * len(buf)
def pwrite(h, buf, offset, flags):
    global written
    written = (type(buf).__name__, buf.readonly, bytes(buf), offset, flags)
"""))
    h = p.open(False, "", False)
    assert p.pread(h, 4, 0, 0) == b"rrrr"
    with pytest.raises(ValueError):
        len(p._ns["kept"])  # released after the call: the script cannot scribble on it later
    p.pwrite(h, memoryview(bytearray(b"data")), 7, 2)
    assert p._ns["written"] == ("memoryview", True, b"data", 7, 2)


@pytest.mark.parametrize("result, message", [
    ("None", "extents method did not return something which is iterable"),
    ("[]", "extents method cannot return an empty list"),
    ("[[0, 4096, 0]]", "extents method did not return an iterable of 3-tuples"),
    ("[(0, 4096)]", "extents method did not return an iterable of 3-tuples"),
    ("[(0, -1, 0)]", "extents: error: OverflowError"),
    ("[(0, 'x', 0)]", "extents: error: TypeError"),
])
def test_bad_extents(load, result, message):
    p = load(HEAD + f"def extents(h, count, offset, flags): return {result}\n")
    e = fails(p.extents, p.open(False, "", False), 4096, 0, 0)
    assert e.errno == errno.EIO and message in e.message


def test_extents_accepts_any_iterable_of_tuples(load):
    p = load(HEAD + "def extents(h, count, offset, flags):\n"
                    "    yield (offset, 512, nbdkit.EXTENT_HOLE)\n"
                    "    yield (offset + 512, count - 512, 0)\n")
    assert p.extents(p.open(False, "", False), 4096, 0, 0) == [(0, 512, 1), (512, 3584, 0)]


def test_exports_and_names(load):
    p = load(HEAD + "def list_exports(ro, tls): return iter(['a', ('b', 'B'), (b'c', b'C')])\n"
                    "def default_export(ro, tls): return b'b'\n")
    assert p.list_exports(False, False) == [("a", ""), ("b", "B"), ("c", "C")]
    assert p.default_export(False, False) == "b"
    bad = load(HEAD + "def list_exports(ro, tls): return [('a', 'b', 'c')]\n"
                      "def default_export(ro, tls): return None\n")
    assert "iterable of 2-tuples" in fails(bad.list_exports, False, False).message
    assert "did not return a string" in fails(bad.default_export, False, False).message


def test_get_size_and_block_size_conversions(load):
    p = load(HEAD.replace("return 1 << 20", "return 1.5") +
             "def block_size(h): return [1, 512, 4096]\n")
    h = p.open(False, "", False)
    assert "get_size: error: TypeError" in fails(p.get_size, h).message
    assert "block_size: error: TypeError" in fails(p.block_size, h).message


# ---- errors ----------------------------------------------------------------------------


def test_set_error_applies_to_the_failing_call_only(load):
    p = load(HEAD + """\
def pwrite(h, buf, offset, flags):
    if offset == 0:
        nbdkit.set_error(errno.ENOSPC)
        raise RuntimeError("full")
    if offset == 1:
        raise RuntimeError("plain")
    nbdkit.set_error(errno.EIO)  # then succeeds: no error
""")
    h = p.open(False, "", False)
    assert fails(p.pwrite, h, memoryview(b"x"), 0, 0).errno == errno.ENOSPC
    assert fails(p.pwrite, h, memoryview(b"x"), 1, 0).errno == errno.EIO
    p.pwrite(h, memoryview(b"x"), 2, 0)


def test_zero_falls_back_whether_it_raises_or_returns(load):
    p = load(HEAD + """\
def zero(h, count, offset, flags):
    if offset == 0:
        nbdkit.set_error(errno.EOPNOTSUPP)
        raise Exception
    if offset == 1:
        nbdkit.set_error(errno.ENOTSUP)
        return
    if offset == 2:
        raise RuntimeError("zero failed")
""")
    h = p.open(False, "", False)
    for offset in (0, 1):
        assert fails(p.zero, h, 4096, offset, 0).errno == errno.EOPNOTSUPP
    e = fails(p.zero, h, 4096, 2, 0)
    assert e.errno == errno.EIO and "zero: error: RuntimeError: zero failed" in e.message
    p.zero(h, 4096, 3, 0)
    assert fails(load(HEAD).zero, h, 4096, 0, 0).errno == errno.EOPNOTSUPP  # no zero at all


def test_missing_data_callbacks(load):
    p = load(HEAD)
    h = p.open(False, "", False)
    for name, args in (("pwrite", (memoryview(b"x"), 0, 0)), ("flush", (0,)),
                       ("trim", (1, 0, 0)), ("cache", (1, 0, 0))):
        e = fails(getattr(p, name), h, *args)
        assert e.errno == errno.EIO and e.message == f"{name} not implemented"


def test_close_errors_are_logged_not_raised(load, caplog):
    p = load(HEAD + "def close(h): raise KeyError('gone')\n")
    with caplog.at_level(logging.ERROR, logger="pynbd.plugins.python"):
        p.close(p.open(False, "", False))
    assert [r.getMessage() for r in caplog.records] == [
        f"{p.script}: close: error: KeyError: 'gone'"]


def test_export_description_errors_mean_no_description(load, caplog):
    p = load(HEAD + "def export_description(h): return 1 / 0\n")
    with caplog.at_level(logging.ERROR, logger="pynbd.plugins.python"):
        assert p.export_description(p.open(False, "", False)) is None
    assert "ZeroDivisionError" in caplog.records[0].getMessage()


# ---- the nbdkit module ------------------------------------------------------------------


def test_set_error_is_per_thread():
    nbdkit._reset_error()
    nbdkit.set_error(errno.ENOSPC)
    seen = []
    t = threading.Thread(target=lambda: (nbdkit.set_error(errno.EPERM),
                                         seen.append(nbdkit._last_error())))
    t.start()
    t.join()
    assert seen == [errno.EPERM] and nbdkit._last_error() == errno.ENOSPC
    nbdkit._reset_error()
    assert nbdkit._last_error() == 0


def test_debug_goes_to_the_verbose_log(caplog):
    with caplog.at_level(logging.DEBUG, logger="pynbd.plugins.python"):
        nbdkit.debug("hello from a script")
    assert caplog.records[0].levelno == logging.DEBUG
    assert caplog.records[0].getMessage() == "python: hello from a script"
    with pytest.raises(TypeError, match="must be str, not bytes"):
        nbdkit.debug(b"x")


def test_connection_functions_outside_a_connection():
    for fn in (nbdkit.export_name, nbdkit.is_tls, nbdkit.peer_pid, nbdkit.peer_uid,
               nbdkit.peer_gid, nbdkit.disconnect):
        with pytest.raises(RuntimeError):
            fn()
    nbdkit.shutdown()  # no server: nothing to do


@pytest.mark.parametrize("text, value", [
    ("0.1", 0.1), ("1e-1", 0.1), ("10%", 0.1), ("1:10", 0.1), ("1/10", 0.1), ("200%", 2.0),
    ("0", 0.0), (" 3 / 4 ", 0.75),
])
def test_parse_probability(text, value):
    assert nbdkit.parse_probability("p", text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "-0.1", "x", "1:0", "1/", "nan", "inf", "10%%"])
def test_parse_probability_errors(text):
    with pytest.raises(ValueError, match="p: could not parse probability"):
        nbdkit.parse_probability("p", text)


@pytest.mark.parametrize("text, value", [
    ("1", (1, 0)), ("1.5", (1, 500000000)), ("100ms", (0, 100000000)), ("20us", (0, 20000)),
    ("20\u03bcs", (0, 20000)), ("5ns", (0, 5)), ("2.5s", (2, 500000000)), (".25", (0, 250000000)),
])
def test_parse_delay(text, value):
    assert nbdkit.parse_delay("d", text) == value


def test_parse_bool():
    assert nbdkit.parse_bool("Yes") is True and nbdkit.parse_bool("off") is False
    with pytest.raises(ValueError):
        nbdkit.parse_bool("maybe")


def test_read_password(tmp_path):
    f = tmp_path / "secret"
    f.write_bytes(b"s3cret\n")
    assert nbdkit.read_password("+" + str(f)) == b"s3cret"
    assert nbdkit.read_password("plain") == b"plain"
    r, w = os.pipe()
    os.write(w, b"from-fd\n")
    os.close(w)
    assert nbdkit.read_password(f"-{r}") == b"from-fd"
    with pytest.raises(OSError):
        os.fstat(r)  # read and closed
    with pytest.raises(RuntimeError):
        nbdkit.read_password("-1")


# ---- telling nbdkit scripts from pynbd plugin modules --------------------------------------


@pytest.mark.parametrize("text, expected", [
    (HEAD, True),
    ("def open(readonly): return 1\ndef get_size(h): return 0\n", False),  # no pread
    ("from pynbd.plugin import Plugin\nclass P(Plugin):\n    name = 'p'\n" + HEAD, False),
    ("import pynbd.plugin\nclass P(pynbd.plugin.Plugin):\n    pass\n" + HEAD, False),
    ("def open(readonly) return 1\n", False),  # not even Python
])
def test_is_nbdkit_script(tmp_path, text, expected):
    from pynbd.plugins.python import is_nbdkit_script

    p = tmp_path / "x.py"
    p.write_text(text)
    assert is_nbdkit_script(str(p)) is expected
    assert is_nbdkit_script(str(tmp_path / "missing.py")) is False


def test_example_scripts_are_nbdkit_scripts():
    from pynbd.plugins.python import is_nbdkit_script

    data = Path(__file__).resolve().parents[1] / "data" / "python"
    for name in ("ex_ramdisk.py", "ex_file.py", "ex_url.py", "ex_faults.py",
                 "ex_missing_module.py"):
        assert is_nbdkit_script(str(data / name)), name
    e2e = Path(__file__).resolve().parent / "plugins" / "e2eplug.py"
    assert not is_nbdkit_script(str(e2e))
