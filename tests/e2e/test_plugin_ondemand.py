"""The ondemand plugin: a filesystem per export name, made on first use and kept; invalid
names refused; a filesystem in use locked (refused, or with wait=true waited for, and the
waiting ends when the server does)."""

from __future__ import annotations

import inspect
import json
import subprocess
from pathlib import Path

import pytest
from helpers import peer_env, require, run_libnbd, run_pynbd, unix_uri

from pynbd.plugins.ondemand import OndemandPlugin
from tests.interop.filesystems_helpers import e2fsck, fetch, need

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
BLANK = 'command=truncate -s $size "$disk"'

#: Connect to each export name of argv[2:] (on the socket argv[1]), write the name at 1 MiB,
#: read it back.
WRITE_NAMES = r'''
import json, sys, nbd
out = {}
for name in sys.argv[2:]:
    h = nbd.NBD(); h.set_export_name(name)
    try:
        h.connect_unix(sys.argv[1])
    except nbd.Error as e:
        out[name] = "refused"
        continue
    h.pwrite(name.encode() or b"<default>", 1048576)
    out[name] = [h.get_size(), bytes(h.pread(16, 1048576)).rstrip(b"\0").decode()]
    h.shutdown()
print(json.dumps(out))
'''

READ_BACK = r'''
import json, sys, nbd
out = {}
for name in sys.argv[2:]:
    h = nbd.NBD(); h.set_export_name(name); h.connect_unix(sys.argv[1])
    out[name] = bytes(h.pread(16, 1048576)).rstrip(b"\0").decode()
    h.shutdown()
print(json.dumps(out))
'''

LIST = r'''
import json, sys, nbd
h = nbd.NBD(); h.set_opt_mode(True); h.connect_uri(sys.argv[1])
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
h.opt_abort()
print(json.dumps(sorted(names)))
'''


def test_filesystems_made_on_demand_and_kept(pynbd_server, tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    srv = pynbd_server("ondemand", f"dir={exports}", "4M", BLANK)
    out = json.loads(run_libnbd(WRITE_NAMES, str(srv.sock), "", "alpha", "beta").stdout)
    assert out == {"": [4 * MIB, "<default>"], "alpha": [4 * MIB, "alpha"],
                   "beta": [4 * MIB, "beta"]}
    assert sorted(p.name for p in exports.iterdir()) == ["alpha", "beta", "default"]
    (exports / ".state").write_text("hidden\n")  # dot-files and ':' are not exports
    (exports / "a:b").write_text("")
    # "" is the default export (the file "default"), as nbdkit lists it
    assert json.loads(run_libnbd(LIST, srv.uri).stdout) == ["", "alpha", "beta"]
    srv.stop()
    # a new server over the same directory: the same filesystems, with what was written
    srv = pynbd_server("ondemand", f"dir={exports}", "4M", BLANK)
    out = json.loads(run_libnbd(READ_BACK, str(srv.sock), "", "default", "alpha", "beta").stdout)
    assert out == {"": "<default>", "default": "<default>", "alpha": "alpha", "beta": "beta"}


def test_mkfs_by_default(pynbd_server, tmp_path: Path) -> None:
    need("mke2fs")
    exports = tmp_path / "exports"
    exports.mkdir()
    srv = pynbd_server("ondemand", f"dir={exports}", "32M", "label=ONDEMAND")
    srv.export = "disk1"
    fetch(srv.uri, tmp_path / "copy.img")
    assert "ONDEMAND" in e2fsck(exports / "disk1")


@pytest.mark.parametrize("name", ["a.b", "a:b", "..", "x" * 256])
def test_invalid_export_names(pynbd_server, tmp_path: Path, name: str) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    srv = pynbd_server("ondemand", f"dir={exports}", "1M", BLANK)
    out = json.loads(run_libnbd(WRITE_NAMES, str(srv.sock), name).stdout)
    assert out == {name: "refused"}
    assert f"invalid exportname \u2018{name}\u2019 rejected" in srv.stderr
    assert list(exports.iterdir()) == []


HOLD = r'''
import subprocess, sys, nbd
sock, holder_export, probe = sys.argv[1], sys.argv[2], sys.argv[3:]
h = nbd.NBD(); h.set_export_name(holder_export); h.connect_unix(sock)
cp = subprocess.run(probe, capture_output=True, text=True)
print(cp.returncode)
h.shutdown()
'''


def test_a_filesystem_in_use_is_locked(pynbd_server, tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    srv = pynbd_server("ondemand", f"dir={exports}", "2M", BLANK)
    nbdinfo = require("nbdinfo")
    sock = srv.sock
    assert sock is not None
    # while one client has "x", another is refused; "y" is free
    held = run_libnbd(HOLD, str(srv.sock), "x", nbdinfo, "--size", unix_uri(sock, "x")).stdout
    assert held.split() == ["1"]
    assert "x: filesystem is locked by another client" in srv.stderr
    held = run_libnbd(HOLD, str(srv.sock), "x", nbdinfo, "--size", unix_uri(sock, "y")).stdout
    assert held.split() == ["0"]
    # once the first has gone, the next gets it
    assert run_libnbd(READ_BACK, str(srv.sock), "x").returncode == 0


def test_readers_share(pynbd_server, tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "ro").write_bytes(bytes(MIB + 16))
    srv = pynbd_server("-r", "ondemand", f"dir={exports}", "1M", BLANK)
    assert srv.sock is not None
    held = run_libnbd(HOLD, str(srv.sock), "ro", require("nbdinfo"), "--size",
                      unix_uri(srv.sock, "ro")).stdout
    assert held.split() == ["0"]


def test_wait_for_the_lock(pynbd_server, tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    srv = pynbd_server("ondemand", f"dir={exports}", "1M", BLANK, "wait=true")
    assert srv.sock is not None
    holder = subprocess.Popen(
        [require("nbdsh"), "-u", unix_uri(srv.sock, "w"), "-c",
         "import sys; print('holding', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=peer_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        waiter = subprocess.Popen([require("nbdinfo"), "--size", unix_uri(srv.sock, "w")],
                                  stdout=subprocess.PIPE, text=True)
        # it waits (the bound is the point: it must not be answered while "w" is held)
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(1.0)
        assert holder.stdin is not None
        holder.stdin.close()  # the holder disconnects: the waiter gets the filesystem
        assert holder.wait(20) == 0
        out, _ = waiter.communicate(timeout=20)
        assert waiter.returncode == 0 and out.strip() == str(MIB)
    finally:
        for p in (holder,):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_waiting_ends_with_the_server(pynbd_server, tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    srv = pynbd_server("ondemand", f"dir={exports}", "1M", BLANK, "wait=true")
    assert srv.sock is not None
    holder = subprocess.Popen(
        [require("nbdsh"), "-u", unix_uri(srv.sock, "w"), "-c",
         "import sys; print('holding', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=peer_env())
    waiter = None
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        waiter = subprocess.Popen([require("nbdinfo"), "--size", unix_uri(srv.sock, "w")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(1.0)  # waiting for the lock
        # the server still stops in time (Server.stop fails otherwise), and so the waiter:
        # refused, or served if the holder's going freed the lock first
        srv.stop()
        waiter.wait(20)
    finally:
        for p in (holder, waiter):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("args, message", [
    ([], "ondemand: dir and size parameters are required"),
    (["1M"], "ondemand: dir and size parameters are required"),
    (["dir=EXPORTS"], "ondemand: dir and size parameters are required"),
    (["dir=EXPORTS/nope", "1M"], "ondemand: realpath: EXPORTS/nope: No such file or directory"),
    (["dir=EXPORTS/file", "1M"], "ondemand: opendir: EXPORTS/file: Not a directory"),
    (["dir=EXPORTS", "1M", "wait=perhaps"], "ondemand: could not decipher boolean (perhaps)"),
    (["dir=EXPORTS", "1M", "disk=x"], ("ondemand: 'disk' parameter cannot be set on the "
                                      "command line")),
])
def test_bad_parameters(tmp_path: Path, sockdir: Path, args: list[str], message: str) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "file").write_text("")
    args = [a.replace("EXPORTS", str(exports)) for a in args]
    r = run_pynbd("serve", "-f", "-U", sockdir / "s", "ondemand", *args, check=False)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err == f"pynbd serve: error: {message.replace('EXPORTS', str(exports))}\n"


def test_manual() -> None:
    lines = inspect.cleandoc(OndemandPlugin.__doc__ or "").splitlines()
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "PARAMETERS", "EXAMPLES"):
        assert section in lines, section
