"""Which callbacks of an nbdkit-API script never block (pynbd.plugins._python_pure), and the
event-loop path that uses it: a PARALLEL script's pure pread is answered on the loop while
every worker thread is busy; an impure one waits for a worker."""

from __future__ import annotations

import mmap
import textwrap
from pathlib import Path

import pytest
from helpers import PYNBD, short_tmpdir, start_server
from rawclient import RawClient

from pynbd.plugins import _nbdkit_module as nbdkit
from pynbd.plugins._python_pure import analyse
from pynbd.plugins.python import PythonPlugin
from pynbd.protocol.constants import Cmd

DATA = Path(__file__).resolve().parents[1] / "data" / "python"


def namespace(src: str) -> dict:
    ns: dict = {"__name__": "__main__", "nbdkit": nbdkit}
    exec(textwrap.dedent(src), ns)  # noqa: S102 - test scripts
    return ns


PURE = {
    "slice_copy": "disk = bytearray(64)\n"
                  "def pread(h, buf, offset, flags): buf[:] = disk[offset:offset + len(buf)]",
    "slice_store": "disk = bytearray(64)\n"
                   "def pwrite(h, buf, offset, flags): disk[offset:offset + len(buf)] = buf",
    "branches_and_errors": """\
        import errno
        disk = bytearray(64)
        def zero(h, count, offset, flags):
            if flags & nbdkit.FLAG_MAY_TRIM:
                disk[offset:offset + count] = bytearray(count)
            else:
                nbdkit.set_error(errno.EOPNOTSUPP)
                raise Exception
        """,
    "constant": "def get_size(h): return 1 << 20",
    "print_in_open": "def open(readonly):\n    print('open: readonly=%d' % readonly)\n"
                     "    return 1",
    "global_counter": "calls = 0\ndef flush(h, flags):\n    global calls\n    calls += 1",
    "fstring": "size = 5\ndef export_description(h): return f'{size:>4} bytes'",
}

IMPURE = {
    "uses_the_handle": "def pread(h, buf, offset, flags): buf[:] = h[offset:offset + 4]",
    "os_call": "import os\ndef pread(h, buf, offset, flags): os.preadv(3, [buf], offset)",
    "script_helper": "def helper(b): pass\ndef pread(h, buf, offset, flags): helper(buf)",
    "loop": "def pread(h, buf, offset, flags):\n    for i in range(3):\n        buf[i] = 0",
    "while": "def pread(h, buf, offset, flags):\n    while True:\n        pass",
    "with_lock": "import threading\nlock = threading.Lock()\n"
                 "def pread(h, buf, offset, flags):\n    with lock:\n        buf[0] = 1",
    "try": "def pread(h, buf, offset, flags):\n    try:\n        buf[0] = 1\n"
           "    except Exception:\n        pass",
    "import_inside": "def pread(h, buf, offset, flags):\n    import os",
    "dict_global": "d = {}\ndef pread(h, buf, offset, flags): buf[:] = d[offset]",
    "method_call": "disk = bytearray(8)\n"
                   "def pread(h, buf, offset, flags): buf[:] = disk.rjust(len(buf))",
    "nbdkit_debug": "def pread(h, buf, offset, flags): nbdkit.debug('x')",
    "sleep": "import time\ndef pread(h, buf, offset, flags): time.sleep(1)",
    "closure": "def make():\n    d = bytearray(8)\n    def pread(h, buf, offset, flags):\n"
               "        buf[:] = d\n    return pread\npread = make()",
    "lambda_inside": "def pread(h, buf, offset, flags): (lambda: 1)()",
    "generator": "def pread(h, buf, offset, flags):\n    yield 1",
    "unknown_global": "def pread(h, buf, offset, flags): buf[:] = nowhere",
    "open_builtin": "def config_complete(): pass\n"
                    "def pread(h, buf, offset, flags): __builtins__['open']('/x')",
    "builtin_open_name": "import builtins\n"
                         "def pread(h, buf, offset, flags): builtins.open('/x')",
    "setattr": "import sys\ndef pread(h, buf, offset, flags): sys.x = 1",
}


@pytest.mark.parametrize("case", sorted(PURE))
def test_pure(case):
    ns = namespace(PURE[case])
    name = next(n for n in ("pread", "pwrite", "zero", "get_size", "open", "flush",
                            "export_description") if n in ns)
    pure = analyse(name, ns[name], ns, nbdkit)
    assert pure is not None and pure.check(ns)


@pytest.mark.parametrize("case", sorted(IMPURE))
def test_impure(case):
    ns = namespace(IMPURE[case])
    assert analyse("pread", ns["pread"], ns, nbdkit) is None


def test_mmap_view_is_not_plain_data(tmp_path):
    f = tmp_path / "backing"
    f.write_bytes(bytes(4096))
    with open(f, "r+b") as fh, mmap.mmap(fh.fileno(), 4096) as m:
        ns = namespace("def pread(h, buf, offset, flags): buf[:] = disk[offset:offset + 4]")
        ns["disk"] = memoryview(m)  # a read may fault pages in from the file
        assert analyse("pread", ns["pread"], ns, nbdkit) is None
        ns["disk"].release()
        ns["disk"] = memoryview(bytearray(4096))
        assert analyse("pread", ns["pread"], ns, nbdkit) is not None


def test_check_notices_rebinding():
    ns = namespace(PURE["slice_copy"])
    pure = analyse("pread", ns["pread"], ns, nbdkit)
    assert pure is not None and pure.check(ns)
    ns["disk"] = {"not": "plain"}
    assert not pure.check(ns)
    ns["disk"] = b"plain again"
    assert pure.check(ns)
    ns["len"] = lambda b: 0  # shadows the builtin
    assert not pure.check(ns)
    del ns["len"]
    ns["pread"] = lambda h, buf, offset, flags: None
    assert not pure.check(ns)


@pytest.mark.parametrize("script, nonblocking", [
    ("ex_ramdisk.py", True), ("ex_file.py", False), ("ex_url.py", False),
    ("ex_faults.py", False), ("calls.py", False), ("nowait.py", False),
])
def test_whole_examples(script, nonblocking):
    p = PythonPlugin()
    try:
        p.config("script", str(DATA / script))
        p.get_thread_model()
        assert p.nonblocking is nonblocking
        assert (p._pure_pread is not None) is (script in ("ex_ramdisk.py", "nowait.py"))
    finally:
        p.unload()


# ---- the event-loop path -------------------------------------------------------------


@pytest.fixture
def nowait_server():
    d = short_tmpdir("pynbd-pynowait-")
    servers = []

    def start(*params: str):
        sock = str(d / f"s{len(servers)}.sock")
        srv = start_server([*PYNBD, "serve", "-f", "-t", "2", "-U", sock, "python",
                            str(DATA / "nowait.py"), f"flag={d / 'go'}", *params],
                           logdir=d / f"s{len(servers)}.log", sock=sock)
        servers.append(srv)
        return srv

    yield start, d / "go"
    for s in servers:
        s.stop()
        assert "Traceback" not in s.stderr


def busy_workers(c: RawClient) -> list[int]:
    """Two writes that wait for the flag file: both worker threads (-t 2) are taken."""
    return [c.request(Cmd.WRITE, i * 4096, 4096, payload=b"w" * 4096)[0] for i in (1, 2)]


def test_pure_pread_is_answered_while_workers_are_busy(nowait_server):
    start, flag = nowait_server
    srv = start()
    with RawClient(srv.sock, timeout=20) as c:
        c.negotiate()
        writes = busy_workers(c)
        read, _ = c.request(Cmd.READ, 0, 512)
        r = c.read_reply()
        assert (r.cookie, r.error, r.data) == (read, 0, bytes(512))
        flag.touch()
        assert sorted(c.read_reply().cookie for _ in writes) == sorted(writes)
        assert c.pread(4096, 4) == b"wwww"


def test_impure_pread_waits_for_a_worker(nowait_server):
    start, flag = nowait_server
    srv = start("impure=1")
    with RawClient(srv.sock, timeout=20) as c:
        c.negotiate()
        writes = busy_workers(c)
        read, _ = c.request(Cmd.READ, 0, 512)
        c.expect_silence(0.3)
        flag.touch()
        cookies = [c.read_reply().cookie for _ in range(3)]
        assert sorted(cookies) == sorted([*writes, read])
