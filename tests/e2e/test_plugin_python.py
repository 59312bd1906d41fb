"""``pynbd serve python SCRIPT``: bad scripts, exceptions in callbacks, per-connection facts
and thread models, end to end against a real server process.

(The comparisons with nbdkit's own python plugin are in tests/interop/test_plugin_python*.)
"""

from __future__ import annotations

import errno
import json
import os
import textwrap
from pathlib import Path

import pytest
from helpers import PYNBD, run_pynbd, short_tmpdir, start_server
from rawclient import RawClient

from pynbd.protocol.constants import Cmd

DATA = Path(__file__).resolve().parents[1] / "data" / "python"
GOOD = """\
def open(readonly): return 1
def get_size(h): return 4096
def pread(h, count, offset): return bytes(count)
"""


@pytest.fixture
def python_server():
    """Start ``pynbd serve -f -U SOCK [OPTIONS] python SCRIPT ARGS``; stop them all after."""
    d = short_tmpdir("pynbd-py-")
    servers = []

    def start(script: str | Path, *args: str, options: tuple[str, ...] = ()):
        sock = str(d / f"s{len(servers)}.sock")
        srv = start_server([*PYNBD, "serve", "-f", "-U", sock, *options, "python", str(script),
                            *args], logdir=d / f"s{len(servers)}.log", sock=sock)
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.stop()


def write(tmp_path: Path, text: str, name: str = "plugin.py") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


# ---- bad scripts and parameters: nbdkit's message, one line, exit status 1 --------------

BAD = {
    "syntax": ("def open(readonly) return 1\n", [],
               "{s}: error running this script: SyntaxError: expected ':' (plugin.py, line 1)"),
    "missing_get_size": ("def open(readonly): return 1\ndef pread(h, c, o): return b''\n", [],
                         ("{s}: one of the required callbacks 'open', 'get_size' or 'pread' is "
                         "not defined by this Python script.  nbdkit requires these callbacks.")),
    "raises_at_load": ("import nbdkit\nraise RuntimeError('no disk today')\n", [],
                       "{s}: error running this script: RuntimeError: no disk today"),
    "missing_module": ("import no_such_module_here\n", [],
                       ("{s}: error running this script: ModuleNotFoundError: "
                       "No module named 'no_such_module_here'")),
    "config_raises": (GOOD + "def config(k, v): raise ValueError('bad key ' + k)\n", ["x=1"],
                      "{s}: config: error: ValueError: bad key x"),
    "config_complete_raises": (GOOD + "def config_complete(): raise RuntimeError('cc')\n", [],
                               "{s}: config_complete: error: RuntimeError: cc"),
    "no_config": (GOOD, ["x=1"], "{s}: this plugin does not need command line configuration"),
    "api_version": ("API_VERSION = 3\n" + GOOD, [],
                    ("{s}: API_VERSION requested unknown version: 3.  This plugin supports API "
                    "versions between 1 and 2.")),
    "thread_model_raises": (GOOD + "def thread_model(): raise RuntimeError('tm')\n", [],
                            "{s}: thread_model: error: RuntimeError: tm"),
    "thread_model_invalid": (GOOD + "def thread_model(): return 7\n", [],
                             "{s}: thread_model: invalid thread model 7"),
    "get_ready_raises": (GOOD + "def get_ready(): raise OSError(5, 'not ready')\n", [],
                         "{s}: get_ready: error: OSError: [Errno 5] not ready"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_script(tmp_path, case):
    text, args, message = BAD[case]
    s = write(tmp_path, text)
    cp = run_pynbd("serve", "-f", "-U", str(tmp_path / "sock"), "python", s, *args,
                   check=False)
    assert cp.returncode == 1
    assert cp.stderr.decode().splitlines() == ["pynbd serve: error: " + message.format(s=s)]


def test_bad_script_traceback_only_with_verbose(tmp_path):
    s = write(tmp_path, "def helper():\n    raise RuntimeError('deep')\nhelper()\n")
    cp = run_pynbd("serve", "-v", "python", s, check=False)
    assert cp.returncode == 1
    err = cp.stderr.decode()
    assert "Traceback (most recent call last)" in err and "in helper" in err
    assert err.splitlines()[-1] == f"pynbd serve: error: {s}: error running this script: " \
                                   "RuntimeError: deep"


@pytest.mark.parametrize("args, message", [
    ([], "the first parameter must be script=/path/to/python/script.py"),
    (["key=value"], "the first parameter must be script=/path/to/python/script.py"),
    (["/no/such/plugin.py"], "/no/such/plugin.py: cannot open file: No such file or directory"),
])
def test_bad_parameters(args, message):
    cp = run_pynbd("serve", "python", *args, check=False)
    assert cp.returncode == 1
    assert cp.stderr.decode().splitlines() == ["pynbd serve: error: " + message]


def test_exit_in_script_ends_with_its_status(tmp_path):
    s = write(tmp_path, "import sys\nsys.exit(7)\n")
    cp = run_pynbd("serve", "python", s, check=False)
    assert cp.returncode == 7 and cp.stderr == b""


def test_script_runs_as_main_with_file_set(tmp_path, python_server):
    out = tmp_path / "seen"
    s = write(tmp_path, f"""\
        import nbdkit
        def config(key, value):
            pass
        def config_complete():
            import json, sys
            with __builtins__.open({str(out)!r}, "w") as f:
                json.dump([__name__, __file__, sys.modules["__main__"].__name__,
                           sys.modules["nbdkit"] is nbdkit], f)
        def open(readonly): return 1
        def get_size(h): return 512
        def pread(h, count, offset): return bytes(count)
        """)
    python_server(s, "a=1")
    assert json.loads(out.read_text()) == ["__main__", s, "__main__", True]


# ---- callbacks raising -----------------------------------------------------------------


def test_callback_exception_is_eio_and_one_log_line(python_server):
    srv = python_server(DATA / "facts.py")
    with RawClient(srv.sock) as c:
        c.negotiate()
        r = c.cmd(Cmd.READ, 4096, 512)
        assert r.error == errno.EIO
        assert c.pread(0, 512)  # the connection lives on
    srv.stop()
    lines = [ln for ln in srv.stderr.splitlines() if "fails on purpose" in ln]
    assert lines == [(f"pynbd: error: {DATA / 'facts.py'}: pread: error: RuntimeError: "
                     "pread fails on purpose")]
    assert "Traceback" not in srv.stderr


def test_debug_messages_only_with_verbose(python_server, tmp_path):
    s = write(tmp_path, GOOD.replace("def open(readonly): return 1",
                                     "import nbdkit\ndef open(readonly):\n"
                                     "    nbdkit.debug('opening, readonly=%s' % readonly)\n"
                                     "    return 1"))
    quiet, verbose = python_server(s), python_server(s, options=("-v",))
    for srv in (quiet, verbose):
        with RawClient(srv.sock) as c:
            c.negotiate()
        srv.stop()
    assert "opening" not in quiet.stderr
    assert "pynbd: debug: python: opening, readonly=False" in verbose.stderr.splitlines()


def test_callback_traceback_with_verbose(python_server):
    srv = python_server(DATA / "facts.py", options=("-v",))
    with RawClient(srv.sock) as c:
        c.negotiate()
        assert c.cmd(Cmd.READ, 4096, 512).error == errno.EIO
    srv.stop()
    err = srv.stderr
    assert "Traceback (most recent call last)" in err
    assert 'raise RuntimeError("pread fails on purpose")' in err


def test_close_exception_is_only_logged(python_server):
    srv = python_server(DATA / "facts.py")
    with RawClient(srv.sock) as c:
        c.negotiate(name="bad-close")
        assert c.pread(0, 512)
        c.disconnect()
        c.expect_hangup()
    with RawClient(srv.sock) as c:  # the server carries on
        c.negotiate()
        assert c.pread(0, 512)
    srv.stop()
    assert f"{DATA / 'facts.py'}: close: error: ValueError: close fails on purpose" in srv.stderr


def test_zero_fallback_whose_pwrite_fails_with_enotsup(python_server):
    """errors.py's block 12: zero sets ENOTSUP (fall back to pwrite) and pwrite fails with
    ENOTSUP too. nbdkit 1.32 aborts on that (an assertion in backend_zero); pynbd answers
    the client with EINVAL, ENOTSUP's NBD error outside fast zeroes."""
    srv = python_server(DATA / "errors.py")
    with RawClient(srv.sock) as c:
        c.negotiate()
        assert c.cmd(Cmd.WRITE_ZEROES, 12 * 4096, 512).error == errno.EINVAL
        assert c.cmd(Cmd.WRITE_ZEROES, 4096 * 30, 512).error == 0


# ---- the nbdkit module in a connection --------------------------------------------------


def facts(c: RawClient) -> dict:
    return json.loads(c.pread(0, 4096))


def test_connection_facts(python_server):
    srv = python_server(DATA / "facts.py")
    with RawClient(srv.sock) as c:
        c.negotiate()
        got = facts(c)
    assert got == {"open_export": "the-default", "export_name": "the-default",
                   "readonly": False, "is_tls": False, "peer_pid": os.getpid(),
                   "peer_uid": os.getuid(), "peer_gid": os.getgid()}
    with RawClient(srv.sock) as c:
        c.negotiate(name="other")
        assert facts(c)["export_name"] == "other"


def test_readonly_is_passed_to_open(python_server):
    srv = python_server(DATA / "facts.py", options=("-r",))
    with RawClient(srv.sock) as c:
        c.negotiate()
        assert facts(c)["readonly"] is True


# ---- thread models -----------------------------------------------------------------------


def stats(path: Path) -> tuple[int, int, int]:
    most, conns, seen = path.read_text().split()
    return int(most), int(conns), int(seen)


def pipelined_reads(clients: list[RawClient], n: int) -> None:
    """Send n reads on each client at once, then wait for every reply."""
    batches = []
    for c in clients:
        batch = b""
        for i in range(n):
            _cookie, data = c.request(Cmd.READ, i * 4096, 4096, send=False)
            batch += data
        batches.append(batch)
    for c, batch in zip(clients, batches, strict=True):
        c.send(batch)
    for c in clients:
        for _ in range(n):
            r = c.read_reply()
            assert r.error == 0 and r.data == bytes(4096)


def connect(srv) -> RawClient:
    c = RawClient(srv.sock)
    c.negotiate()
    return c


def test_default_thread_model_serializes_all_requests(python_server, tmp_path):
    """No thread_model(): SERIALIZE_ALL_REQUESTS, one callback at a time across every
    connection (two clients each with three reads in flight never overlap)."""
    f = tmp_path / "stats"
    srv = python_server(DATA / "overlap.py", f"stats={f}", "sleep=0.05")
    a, b = connect(srv), connect(srv)
    try:
        pipelined_reads([a, b], 3)
    finally:
        a.close()
        b.close()
    assert stats(f) == (1, 1, 2)


def test_parallel_thread_model_runs_concurrently(python_server, tmp_path):
    f = tmp_path / "stats"
    srv = python_server(DATA / "overlap.py", f"stats={f}", "model=parallel",
                        options=("-t", "4"))
    with connect(srv) as c:
        pipelined_reads([c], 6)
    most, _conns, _seen = stats(f)
    assert 1 < most <= 4  # -t 4: at most four at once on one connection


def test_serialize_requests_thread_model(python_server, tmp_path):
    f = tmp_path / "stats"
    srv = python_server(DATA / "overlap.py", f"stats={f}", "model=serialize_requests",
                        "sleep=0.2")
    a, b = connect(srv), connect(srv)
    try:
        pipelined_reads([a, b], 3)
    finally:
        a.close()
        b.close()
    assert stats(f) == (2, 2, 2)  # one per connection, both connections at once


# ---- server control from a script --------------------------------------------------------

CONTROL = """\
import nbdkit
API_VERSION = 2
def preconnect(readonly):
    if readonly:
        raise PermissionError("read-only clients are turned away")
def open(readonly): return 1
def get_size(h): return 1 << 20
def pread(h, buf, offset, flags):
    if offset == 4096:
        nbdkit.disconnect(True)
    elif offset == 8192:
        nbdkit.shutdown()
    buf[:] = bytes(len(buf))
"""


def test_disconnect_from_a_callback(python_server, tmp_path):
    srv = python_server(write(tmp_path, CONTROL))
    with RawClient(srv.sock) as c:
        c.negotiate()
        c.request(Cmd.READ, 4096, 512)
        c.expect_hangup()
    with RawClient(srv.sock) as c:  # only that client went
        c.negotiate()
        assert c.pread(0, 512) == bytes(512)


def test_shutdown_from_a_callback(python_server, tmp_path):
    srv = python_server(write(tmp_path, CONTROL))
    with RawClient(srv.sock) as c:
        c.negotiate()
        c.pread(8192, 512)  # answered; then the server winds down
        c.expect_hangup()
    assert srv.proc.wait(10) == 0


def test_preconnect_refusal(python_server, tmp_path):
    srv = python_server(write(tmp_path, CONTROL), options=("-r",))
    with RawClient(srv.sock) as c:
        c.expect_hangup()
    srv.stop()
    lines = [ln for ln in srv.stderr.splitlines() if "turned away" in ln]
    assert len(lines) == 1 and "preconnect: error: PermissionError" in lines[0]
