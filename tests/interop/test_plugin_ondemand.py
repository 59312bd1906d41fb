"""ondemand side by side with nbdkit's: the same exports listed from the same directory, the
same answers for data and for refused names, and the same locks: a filesystem one server's
client holds is refused by the other server (both take open file description locks)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import require, run_libnbd, run_pynbd, unix_uri
from side_by_side import assert_views_equal, probe

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
FUA = 1
BLANK = 'command=truncate -s $size "$disk"'

OPS = [("size",), ("pread", 4096, 0), ("pwrite", b"\xa5" * 4096, 8192, FUA), ("flush",),
       ("pread", 16384, 0), ("trim", 65536, MIB), ("zero", 4096, 0), ("pread", 8192, 0)]

LIST = r'''
import json, sys, nbd
h = nbd.NBD(); h.set_opt_mode(True); h.connect_uri(sys.argv[1])
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
h.opt_abort()
print(json.dumps(sorted(names)))
'''

HOLD = r'''
import subprocess, sys, nbd
sock, export, probe = sys.argv[1], sys.argv[2], sys.argv[3:]
h = nbd.NBD(); h.set_export_name(export); h.connect_unix(sock)
print(subprocess.run(probe, capture_output=True).returncode)
h.shutdown()
'''


def exports_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


@pytest.mark.parametrize("export", ["", "disk1"])
def test_data_as_nbdkit(pynbd_server, nbdkit_server, tmp_path: Path, export: str) -> None:
    # (the export goes in the URI: libnbd's connect_uri sets the export name from it)
    got = probe(pynbd_server("ondemand", f"dir={exports_dir(tmp_path, 'p')}", "2M",
                             BLANK, export=export).uri, OPS)
    want = probe(nbdkit_server("ondemand", f"dir={exports_dir(tmp_path, 'n')}", "2M",
                               BLANK, export=export).uri, OPS)
    assert_views_equal(got, want, f"ondemand export {export!r}")
    name = export or "default"
    assert (tmp_path / "p" / name).read_bytes() == (tmp_path / "n" / name).read_bytes()


@pytest.mark.parametrize("export", ["a.b", "a:b", "x" * 256])
def test_refused_names_as_nbdkit(pynbd_server, nbdkit_server, tmp_path: Path,
                                 export: str) -> None:
    d = exports_dir(tmp_path, "e")
    args = ["ondemand", f"dir={d}", "1M", BLANK]
    got = probe(pynbd_server(*args, export=export).uri)
    want = probe(nbdkit_server(*args, export=export).uri)
    assert_views_equal(got, want, f"ondemand export {export!r}")
    assert "connect_error" in got and list(d.iterdir()) == []


def test_same_exports_listed(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    d = exports_dir(tmp_path, "e")
    for name in ("default", "one", "two", ".hidden", "x:y", "v1.img"):
        (d / name).write_bytes(bytes(MIB))
    lists = [json.loads(run_libnbd(LIST, srv("ondemand", f"dir={d}", "1M").uri).stdout)
             for srv in (pynbd_server, nbdkit_server)]
    assert lists[0] == lists[1] == ["", "one", "two"]


def test_locks_are_nbdkits(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    d = exports_dir(tmp_path, "shared")
    p = pynbd_server("ondemand", f"dir={d}", "1M", BLANK)
    n = nbdkit_server("ondemand", f"dir={d}", "1M", BLANK)
    nbdinfo = require("nbdinfo")
    assert p.sock is not None and n.sock is not None
    # a pynbd client holds "w": nbdkit refuses it; and the other way round
    out = run_libnbd(HOLD, p.sock, "w", nbdinfo, "--size", unix_uri(n.sock, "w")).stdout
    assert out.split() == ["1"]
    assert "w: filesystem is locked by another client" in n.stderr
    out = run_libnbd(HOLD, n.sock, "w", nbdinfo, "--size", unix_uri(p.sock, "w")).stdout
    assert out.split() == ["1"]
    assert "w: filesystem is locked by another client" in p.stderr
    out = run_libnbd(HOLD, n.sock, "w", nbdinfo, "--size", unix_uri(p.sock, "v")).stdout
    assert out.split() == ["0"]


@pytest.mark.parametrize("args, message", [
    ([], "dir and size parameters are required"),
    (["dir=D"], "dir and size parameters are required"),
    (["dir=D/nope", "1M"], "realpath: D/nope: No such file or directory"),
    (["dir=D", "1M", "wait=perhaps"], "could not decipher boolean (perhaps)"),
    (["dir=D", "1M", "disk=x"], "'disk' parameter cannot be set on the command line"),
])
def test_bad_parameters_as_nbdkit(tmp_path: Path, sockdir: Path, args: list[str],
                                  message: str) -> None:
    d = exports_dir(tmp_path, "e")
    args = [a.replace("D", str(d), 1) if a.startswith("dir=") else a for a in args]
    message = message.replace("D/", f"{d}/")
    mine = run_pynbd("serve", "-f", "-U", sockdir / "p", "ondemand", *args, check=False)
    theirs = subprocess.run([require("nbdkit"), "-f", "-U", sockdir / "n", "ondemand", *args],
                            capture_output=True, check=False, timeout=60)
    assert mine.returncode == theirs.returncode == 1
    assert message in mine.stderr.decode() and message in theirs.stderr.decode()
