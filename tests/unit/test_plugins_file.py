"""Unit tests of the file plugin on real temporary files and directories."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import missing

from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, CacheMode, Flag, FuaMode
from pynbd.plugins.file import FilePlugin

HOLE = EXTENT_HOLE | EXTENT_ZERO
MiB = 1 << 20
#: This checkout's sources, for the child processes.
SRC = Path(__file__).resolve().parents[2] / "src"


def configure(*args: str, **params: str) -> FilePlugin:
    p = FilePlugin()
    for a in args:
        p.config("file", a)
    for k, v in params.items():
        p.config(k, v)
    p.config_complete()
    return p


def read(p: FilePlugin, h: Any, count: int, offset: int) -> bytes:
    return bytes(p.pread(h, count, offset, 0))


@pytest.fixture
def opened(tmp_path: Path) -> Any:
    """A sparse 4 MiB file, opened read-write; closed at the end."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    p = configure(str(path))
    h = p.open(False, "", False)
    yield p, h, path
    p.close(h)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_read_write(opened: Any) -> None:
    p, h, path = opened
    assert p.get_size(h) == 4 * MiB
    assert p.can_write(h) and p.can_flush(h) and p.can_trim(h) and p.can_zero(h)
    assert p.can_multi_conn(h) and p.can_extents(h)
    assert p.can_fua(h) == FuaMode.NATIVE and p.can_cache(h) == CacheMode.NATIVE
    assert not p.can_fast_zero(h)  # as nbdkit 1.32: zero may fall back to writing
    assert not p.is_rotational(h)
    assert read(p, h, 4096, 0) == bytes(4096)
    p.pwrite(h, memoryview(b"hello world"), 1000, 0)
    p.pwrite(h, b"fua!", 3 * MiB, Flag.FUA)
    p.flush(h, 0)
    assert read(p, h, 13, 999) == b"\0hello world\0"
    with open(path, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(4) == b"fua!"
    # pread_into fills the server's buffer in place
    buf = bytearray(11)
    p.pread_into(h, memoryview(buf), 1000, 0)
    assert buf == b"hello world"
    p.cache(h, MiB, 0, 0)


def test_file_grows_between_connections(opened: Any) -> None:
    p, h, path = opened
    with open(path, "r+b") as f:
        f.truncate(5 * MiB)
    assert p.get_size(h) == 5 * MiB


def test_read_past_end_of_file_is_eio(opened: Any) -> None:
    p, h, path = opened
    with open(path, "r+b") as f:
        f.truncate(MiB)  # shrunk under the server's feet
    with pytest.raises(CommandError) as ei:
        p.pread(h, 4096, 2 * MiB, 0)
    assert ei.value.errno == errno.EIO


def test_extents_sparse_file(opened: Any) -> None:
    p, h, _ = opened
    assert p.extents(h, 4 * MiB, 0, 0) == [(0, 4 * MiB, HOLE)]
    p.pwrite(h, b"x" * MiB, MiB, 0)
    p.pwrite(h, b"y" * 4096, 4 * MiB - 4096, 0)
    exts = p.extents(h, 4 * MiB, 0, 0)
    assert exts == [(0, MiB, HOLE), (MiB, MiB, 0), (2 * MiB, 2 * MiB - 4096, HOLE),
                    (4 * MiB - 4096, 4096, 0)]
    assert p.extents(h, 4 * MiB, 0, Flag.REQ_ONE) == [(0, MiB, HOLE)]
    # may run past the request, like nbdkit's (the server clips)
    assert p.extents(h, 4096, MiB + 4096, 0) == [(MiB + 4096, MiB - 4096, 0)]
    # data at the end: the final lseek(SEEK_DATA) hits ENXIO
    p.trim(h, 4096, 4 * MiB - 4096, 0)
    assert p.extents(h, MiB, 3 * MiB, 0) == [(3 * MiB, MiB, HOLE)]


def test_trim_punches_holes(opened: Any) -> None:
    p, h, path = opened
    p.pwrite(h, b"\xaa" * (2 * MiB), 0, 0)
    p.flush(h, 0)
    before = allocated(path)
    assert before >= 2 * MiB
    p.trim(h, MiB, 0, Flag.FUA)
    assert allocated(path) <= before - MiB
    assert read(p, h, MiB, 0) == bytes(MiB)
    assert read(p, h, 10, MiB) == b"\xaa" * 10
    assert p.extents(h, 2 * MiB, 0, 0)[0] == (0, MiB, HOLE)


def test_zero(opened: Any) -> None:
    p, h, path = opened
    p.pwrite(h, b"\xbb" * (3 * MiB), 0, 0)
    p.flush(h, 0)
    # MAY_TRIM: a hole is punched
    before = allocated(path)
    p.zero(h, MiB, 0, Flag.MAY_TRIM)
    assert allocated(path) <= before - MiB
    assert read(p, h, MiB + 1, 0) == bytes(MiB) + b"\xbb"
    # no MAY_TRIM: zeroes, and the blocks stay allocated (ZERO_RANGE or punch + fallocate)
    before = allocated(path)
    p.zero(h, MiB, MiB, Flag.FUA)
    assert allocated(path) == before
    assert read(p, h, MiB + 2, MiB - 1) == bytes(MiB + 1) + b"\xbb"
    # unaligned
    p.zero(h, 3, 2 * MiB + 1, 0)
    assert read(p, h, 5, 2 * MiB) == b"\xbb\0\0\0\xbb"


def test_zero_without_fast_method_is_enotsup(opened: Any) -> None:
    p, h, _ = opened
    p.pwrite(h, b"\xcc" * 8192, 0, 0)
    h.can_punch_hole = h.can_zero_range = h.can_fallocate = False
    h.can_zeroout = False
    for flags in (0, Flag.FAST_ZERO, Flag.MAY_TRIM | Flag.FAST_ZERO):
        with pytest.raises(CommandError) as ei:
            p.zero(h, 4096, 0, flags)
        assert ei.value.errno == errno.ENOTSUP  # the server falls back (or fails fast)
    assert read(p, h, 4, 0) == b"\xcc" * 4


def test_readonly_open(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(b"abc" * 1000)
    p = configure(str(path))
    h = p.open(True, "", False)
    try:
        assert not p.can_write(h)
        assert read(p, h, 3, 3) == b"abc"
        with pytest.raises(OSError) as ei:
            p.pwrite(h, b"x", 0, 0)
        assert ei.value.errno == errno.EBADF
    finally:
        p.close(h)


#: Opens the file plugin's file read-write as the server would, and reports what it got:
#: can_write, the first 4 bytes, and the errno of a write (0: the write went through).
_OPEN_RW = """
import sys
from pynbd.plugins.file import FilePlugin
p = FilePlugin()
p.config("file", sys.argv[1])
p.config_complete()
h = p.open(False, "", False)
data = bytes(p.pread(h, 4, 0, 0))
try:
    p.pwrite(h, b"w", 0, 0)
    err = 0
except OSError as e:
    err = e.errno
print(p.can_write(h), data.hex(), err)
"""


def _open_rw(path: Path, *wrap: str) -> tuple[str, str, int]:
    """Run _OPEN_RW on `path` in a child process, after `wrap` (a command prefix)."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    cp = subprocess.run([*wrap, sys.executable, "-c", _OPEN_RW, str(path)], check=False,
                        capture_output=True, text=True, timeout=60, env=env)
    assert cp.returncode == 0, cp.stderr
    can_write, head, err = cp.stdout.split()
    return can_write, head, int(err)


def _without_dac_override() -> list[str]:
    """A command prefix under which root, too, obeys file modes (no CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        missing("setpriv not found (Debian package util-linux)")
    return [setpriv, "--bounding-set=-dac_override"]


def test_readonly_file_served_readonly(tmp_path: Path) -> None:
    """A file the server may not write (mode 0444: O_RDWR fails with EACCES) is served
    read-only, as nbdkit does. Root may write any file through CAP_DAC_OVERRIDE, so the
    plugin runs in a child process without it; root's own run shows the file is otherwise
    written (the reason the test once skipped as root)."""
    path = tmp_path / "ro.img"
    path.write_bytes(b"\xab" * 4096)
    path.chmod(0o444)
    assert _open_rw(path, *_without_dac_override()) == ("False", "abababab", errno.EBADF)
    assert path.read_bytes() == b"\xab" * 4096
    if os.geteuid() == 0:  # the control: the same file, opened with the capability
        assert _open_rw(path) == ("True", "abababab", 0)
        assert path.read_bytes()[:1] == b"w"


def test_file_on_readonly_mount_served_readonly(tmp_path: Path) -> None:
    """A writable file on a read-only mount (O_RDWR fails with EROFS) is served read-only:
    a read-only bind mount of its directory, in a private mount namespace (unshare -m, with
    -r when not root), so nothing outside the test sees the mount."""
    unshare = shutil.which("unshare")
    if unshare is None:
        missing("unshare not found (Debian package util-linux)")
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xcd" * 4096)
    path.chmod(0o644)
    userns = ["-r"] if os.geteuid() != 0 else []
    probe = subprocess.run([unshare, *userns, "-m", "true"], check=False, capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:
        missing(f"cannot make a mount namespace here: {probe.stderr.strip()}")
    d = str(tmp_path)
    ro_mount = [unshare, *userns, "-m", "sh", "-ec",
                f'mount --bind "{d}" "{d}" && mount -o remount,bind,ro "{d}" && exec "$@"', "sh"]
    assert _open_rw(path, *ro_mount) == ("False", "cdcdcdcd", errno.EBADF)
    assert path.read_bytes() == b"\xcd" * 4096
    # the control: the same command without the read-only mount writes the file
    assert _open_rw(path, unshare, *userns, "-m") == ("True", "cdcdcdcd", 0)
    assert path.read_bytes()[:1] == b"w"


def test_close_closes_fd(opened: Any) -> None:
    p, _, _ = opened
    h = p.open(False, "", False)
    fd = h.fd
    os.fstat(fd)
    p.close(h)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_relative_path_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rel.img").write_bytes(bytes(512))
    monkeypatch.chdir(tmp_path)
    p = configure("rel.img")
    monkeypatch.chdir("/")
    h = p.open(True, "", False)
    try:
        assert p.get_size(h) == 512
        assert p._filename == str(tmp_path.resolve() / "rel.img")
    finally:
        p.close(h)


def test_fadvise_and_cache_modes(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(MiB))
    for params in ({"fadvise": "random"}, {"fadvise": "sequential", "cache": "none"},
                   {"cache": "default", "fadvise": "normal"}):
        p = configure(str(path), **params)
        h = p.open(False, "", False)
        try:
            for i in range(20):  # more than the write-back window under cache=none
                p.pwrite(h, b"%02d" % i * 2048, i * 4096, 0)
            assert read(p, h, 4, 19 * 4096) == b"1919"
        finally:
            p.close(h)


@pytest.mark.parametrize("params,message", [
    ({}, r"you must supply \[file=\]<FILENAME> or dir=<DIRNAME>"),
    ({"fadvise": "fast"}, r"unknown fadvise mode: fast"),
    ({"cache": "writeback"}, r"unknown cache mode: writeback"),
    ({"rdelay": "1"}, r"add --filter=delay"),
    ({"fd": "5"}, r"fd= is not supported"),
    ({"foo": "bar"}, r"unknown parameter 'foo'"),
])
def test_config_errors(params: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        configure(**params)


def test_config_path_errors(tmp_path: Path) -> None:
    f = tmp_path / "f.img"
    f.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"realpath: .*nosuch: No such file"):
        configure(str(tmp_path / "nosuch"))
    with pytest.raises(ConfigError, match=r"use dir= to serve files within"):
        configure(str(tmp_path))
    with pytest.raises(ConfigError, match=r"expecting a directory"):
        configure(dir=str(f))
    with pytest.raises(ConfigError, match=r"can only appear once"):
        configure(str(f), dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"can only appear once"):
        configure(str(f), str(f))
    with pytest.raises(ConfigError, match=r"not regular or block device"):
        configure("/dev/null")
    p = configure(str(f))
    assert p.list_exports(False, False) is None
    assert p.default_export(False, False) == ""


def test_dir_mode(tmp_path: Path) -> None:
    d = tmp_path / "images"
    d.mkdir()
    (d / "b.img").write_bytes(b"B" * 1024)
    (d / "a.img").write_bytes(b"A" * 512)
    (d / ".hidden").write_bytes(b"H")
    (d / "subdir").mkdir()
    (d / "link.img").symlink_to(d / "a.img")
    (d / "dangling").symlink_to(d / "nowhere")
    os.mkfifo(d / "fifo")
    p = configure(directory=str(d))
    assert p.list_exports(False, False) == [
        (".hidden", ""), ("a.img", ""), ("b.img", ""), ("link.img", "")]
    assert p.default_export(False, False) is None
    h = p.open(False, "b.img", False)
    try:
        assert p.get_size(h) == 1024
        p.pwrite(h, b"xx", 0, 0)
        assert read(p, h, 3, 0) == b"xxB"
    finally:
        p.close(h)
    h = p.open(True, "link.img", False)
    try:
        assert read(p, h, 2, 0) == b"AA" and not p.can_write(h)
    finally:
        p.close(h)
    (d / "c.img").write_bytes(b"")  # the directory is read at each request
    assert ("c.img", "") in (p.list_exports(False, False) or [])


@pytest.mark.parametrize("name,err", [
    ("", errno.ENOENT), ("nosuch", errno.ENOENT), ("../escape.img", errno.EINVAL),
    ("..", errno.EINVAL), (".", errno.EINVAL), ("subdir/x", errno.EINVAL),
    ("subdir", None), ("fifo", None)])
def test_dir_mode_refused_names(tmp_path: Path, name: str, err: int | None) -> None:
    (tmp_path / "escape.img").write_bytes(b"secret")
    d = tmp_path / "images"
    d.mkdir()
    (d / "subdir").mkdir()
    os.mkfifo(d / "fifo")
    p = configure(dir=str(d))
    with pytest.raises((OSError, CommandError)) as ei:
        p.open(True, name, False)
    if err is not None:
        assert getattr(ei.value, "errno", None) == err
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) < 100  # and no fd leaked


def test_no_fd_leak_on_refused_open(tmp_path: Path) -> None:
    d = tmp_path / "images"
    d.mkdir()
    (d / "subdir").mkdir()
    p = configure(dir=str(d))
    before = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    for _ in range(20):
        with pytest.raises((OSError, CommandError)):
            p.open(True, "subdir", False)
        with pytest.raises((OSError, CommandError)):
            p.open(False, "nosuch", False)
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) == before


def test_dump_plugin() -> None:
    lines = FilePlugin().dump_plugin()
    assert "file_extents=yes" in lines
    assert all("=" in line for line in lines)
