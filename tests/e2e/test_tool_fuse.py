"""`pynbd fuse` end to end: a real kernel FUSE mount of a real `pynbd serve`.

Every mount goes through the `fuse_mount` fixture, which unmounts and reaps it even when the
test fails. The loop-device story (losetup + mkfs.ext4 + mount) runs where loop devices work
and says why not otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from fuse_helpers import fuse_mount, in_threads, is_mounted  # noqa: F401 (fixture)
from helpers import PYNBD, missing, run_pynbd

from pynbd.tools.fuse import RELEASE_TIMEOUT

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def pattern(n: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (n // len(block) + 1))[:n]


def read_back(uri: str, size: int, offset: int = 0) -> bytes:
    from pynbd.client import Client

    with Client.connect(uri) as c:
        return bytes(c.pread(size, offset))


# ------------------------------------------------------------------------- command line
@pytest.mark.parametrize("args, message", [
    ([], "needs a MOUNTPOINT"),
    (["/tmp"], "needs a URI or a mode"),
    (["/nonexistent-dir/x/y", "nbd://localhost"], "mountpoint must be"),
    (["nodirhere", "nbd://localhost"], "mountpoint must be"),
    (["/tmp", "--bogus-mode", "x"], "unknown mode: --bogus-mode"),
    (["--bogus", "/tmp", "nbd://x"], "option --bogus not recognized"),
    (["-o", "nosuchopt", "/tmp", "nbd://x"], "unknown FUSE option: -o nosuchopt"),
    (["-C", "zero", "/tmp", "nbd://x"], "could not parse number of connections: zero"),
    (["-C", "0", "/tmp", "nbd://x"], "number of connections out of range"),
    (["/tmp", "--fd", "x"], "could not parse file descriptor: x"),
    (["/tmp", "--vsock", "1"], "--vsock: needs CID PORT"),
    (["/tmp", "--tcp", "localhost", "port"], "could not parse port: port"),
    (["/tmp", "[", "nbdkit", "memory", "1M"], "closing ]"),
    (["/tmp", "--command"], "--command: needs a command to run"),
    (["/tmp", "nbd://a", "nbd://b"], "URI mode: needs exactly a URI"),
])
def test_bad_command_line(args: list[str], message: str) -> None:
    r = run_pynbd("fuse", *args, check=False)
    err = r.stderr.decode()
    assert r.returncode == 1
    assert err.count("\n") == 1 and err.startswith("pynbd fuse: "), err
    assert message in err
    assert r.stdout == b""


def test_help_version() -> None:
    r = run_pynbd("fuse", "--help")
    assert b"MOUNTPOINT[/FILENAME] URI" in r.stdout and b"fusermount3 -u" in r.stdout
    r = run_pynbd("fuse", "-V")
    assert r.stdout.decode().startswith("pynbd fuse ")
    r = run_pynbd("fuse", "--fuse-help")
    assert b"-o allow_other" in r.stdout and b"-o direct_io" in r.stdout


def test_bad_server_is_one_line(fuse_mount) -> None:  # noqa: F811
    m = fuse_mount("nbd+unix:///?socket=/nonexistent/sock", wait=False)
    assert m.wait_exit() == 1
    err = m.stderr
    assert err.startswith("pynbd fuse: ") and err.count("\n") == 1, err
    assert not is_mounted(m.mountpoint)


# ------------------------------------------------------------------------- data and metadata
def test_round_trip_and_stat(pynbd_server, fuse_mount) -> None:  # noqa: F811
    srv = pynbd_server("memory", "4M")
    m = fuse_mount(srv.uri)
    st = os.stat(m.file)
    assert m.file.name == "nbd"  # the default name in a directory
    assert st.st_size == 4 * MiB
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
    assert sorted(os.listdir(m.mountpoint)) == ["nbd"]
    data = pattern(3 * MiB + 1234)
    with open(m.file, "r+b", buffering=0) as f:
        f.seek(100_000)
        f.write(data)
        os.fsync(f.fileno())
        f.seek(100_000)
        assert f.read(len(data)) == data
    assert read_back(srv.uri, len(data), 100_000) == data
    assert m.unmount() == 0


def test_mount_through_fusermount3(pynbd_server, fuse_mount) -> None:  # noqa: F811
    """The non-root path (fusermount3 mounts and passes the FUSE device back), forced for
    root by PYNBD_FUSE_FUSERMOUNT=1; SIGTERM unmounts through fusermount3 -u too."""
    srv = pynbd_server("memory", "1M")
    m = fuse_mount(srv.uri, env={"PYNBD_FUSE_FUSERMOUNT": "1"})
    with open(m.file, "r+b") as f:
        f.write(b"via fusermount3")
    assert m.file.read_bytes()[:15] == b"via fusermount3"
    m.proc.send_signal(signal.SIGTERM)
    assert m.wait_exit() == 0, m.stderr
    assert not is_mounted(m.mountpoint)
    assert read_back(srv.uri, 15) == b"via fusermount3"


def test_named_file_and_naked_mount(pynbd_server, fuse_mount) -> None:  # noqa: F811
    srv = pynbd_server("pattern", "1M")
    m = fuse_mount(srv.uri, name="disk.raw")
    assert os.listdir(m.mountpoint) == ["disk.raw"]
    assert m.file.read_bytes() == read_back(srv.uri, MiB)
    assert not os.path.exists(m.mountpoint / "nbd")
    n = fuse_mount(srv.uri, file_mode=True)
    assert os.stat(n.file).st_size == MiB
    assert n.file.read_bytes()[:4096] == read_back(srv.uri, 4096)
    assert m.unmount() == 0 and n.unmount() == 0
    assert n.file.stat().st_size == 0  # the file mounted over is as it was


def test_read_only(pynbd_server, fuse_mount) -> None:  # noqa: F811
    srv = pynbd_server("-r", "memory", "1M")
    m = fuse_mount(srv.uri)  # -r is implied by a read-only server
    assert stat.S_IMODE(os.stat(m.file).st_mode) == 0o444
    with pytest.raises(PermissionError):
        os.open(m.file, os.O_RDWR)
    assert len(m.file.read_bytes()) == MiB
    w = pynbd_server("memory", "1M")
    r = fuse_mount(w.uri, options=["-r"])
    assert stat.S_IMODE(os.stat(r.file).st_mode) == 0o444
    with pytest.raises(PermissionError):
        os.open(r.file, os.O_WRONLY)
    fa = subprocess.run(["fallocate", "-p", "-o", "0", "-l", "4096", str(r.file)],
                        capture_output=True, text=True, check=False)
    assert fa.returncode != 0 and "Permission denied" in fa.stderr


def test_writes_at_the_end(pynbd_server, fuse_mount) -> None:  # noqa: F811
    srv = pynbd_server("memory", "64K")
    m = fuse_mount(srv.uri)
    fd = os.open(m.file, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"z" * 100, 65536 - 10) == 10  # clipped at the end
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"y", 65536)
        assert e.value.errno == errno.ENOSPC  # a disk cannot grow
        assert os.pread(fd, 100, 65536 - 10) == b"z" * 10
        assert os.pread(fd, 100, 65536) == b""
        os.truncate(m.file, 0)  # accepted and ignored, as on a block device
        assert os.stat(m.file).st_size == 65536
        with open(m.file, "wb") as f:  # O_TRUNC too: `cp disk.raw MOUNT/nbd` works
            f.write(b"new start")
        assert os.stat(m.file).st_size == 65536
        assert os.pread(fd, 10, 65536 - 10) == b"z" * 10  # the rest is untouched
        with pytest.raises(PermissionError):
            os.chmod(m.file, 0o600)
    finally:
        os.close(fd)
    assert read_back(srv.uri, 10, 65536 - 10) == b"z" * 10
    # requests answered at once (past the end) leave nothing behind for the shutdown: it
    # does not wait out RELEASE_TIMEOUT for them
    t = time.monotonic()
    m.proc.send_signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    assert "giving up" not in m.stderr
    assert time.monotonic() - t < RELEASE_TIMEOUT


def test_fallocate_trim_and_zero(pynbd_server, fuse_mount) -> None:  # noqa: F811
    srv = pynbd_server("memory", "1M")
    m = fuse_mount(srv.uri)
    with open(m.file, "r+b", buffering=0) as f:
        f.write(b"\xff" * (256 * 1024))
    subprocess.run(["fallocate", "-p", "-o", "4096", "-l", "8192", str(m.file)], check=True)
    subprocess.run(["fallocate", "-z", "-o", "65536", "-l", "65536", str(m.file)], check=True)
    got = read_back(srv.uri, 256 * 1024)
    assert got[:4096] == b"\xff" * 4096
    assert got[4096:12288] == bytes(8192)  # punched (NBD trim; memory reads trimmed as 0)
    assert got[12288:65536] == b"\xff" * (65536 - 12288)
    assert got[65536:131072] == bytes(65536)  # zero range (NBD write zeroes)
    assert got[131072:] == b"\xff" * (256 * 1024 - 131072)
    # the kernel's view agrees (no stale page cache after the fallocate)
    assert m.file.read_bytes()[:256 * 1024] == got


def test_parallel_requests(pynbd_server, fuse_mount) -> None:  # noqa: F811
    """Many readers and writers at once through one mount: each sees its own data."""
    srv = pynbd_server("memory", "8M")
    m = fuse_mount(srv.uri)

    def worker(i: int) -> None:
        fd = os.open(m.file, os.O_RDWR)
        try:
            blob = pattern(64 * 1024, i)
            for k in range(8):
                off = (i * 8 + k) * 64 * 1024
                os.pwrite(fd, blob, off)
                assert os.pread(fd, len(blob), off) == blob
        finally:
            os.close(fd)

    in_threads(worker, 16)
    got = read_back(srv.uri, 8 * MiB)
    for i in range(16):
        for k in range(8):
            off = (i * 8 + k) * 64 * 1024
            assert got[off:off + 64 * 1024] == pattern(64 * 1024, i)


def test_multi_conn_and_verbose(pynbd_server, fuse_mount) -> None:  # noqa: F811
    srv = pynbd_server("memory", "1M")
    m = fuse_mount(srv.uri, options=["-v", "-C", "3"])
    m.file.read_bytes()
    assert m.unmount() == 0
    assert "3 connection(s)" in m.stderr  # memory allows multi-conn
    assert "read: count=" in m.stderr
    one = fuse_mount(srv.uri, options=["-v", "-C", "1", "-s"])
    one.file.read_bytes()
    assert one.unmount() == 0
    assert "1 connection(s)" in one.stderr


# ------------------------------------------------------------------------- modes and lifetime
def _python_children(m) -> list[int]:
    out = []
    for pid in m.children():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"pynbd" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def _wait_for(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_worker_process_serves_and_goes(pynbd_server, fuse_mount) -> None:  # noqa: F811
    """With multi-conn, worker processes serve the mount, each on its own connection; they
    answer requests, and they are gone after the unmount."""
    srv = pynbd_server("memory", "4M")
    m = fuse_mount(srv.uri, options=["-v", "-C", "2"])
    assert _wait_for(lambda: len(_python_children(m)) == 2)
    workers = _python_children(m)
    data = pattern(4 * MiB, 11)

    def rw(i: int) -> None:
        fd = os.open(m.file, os.O_RDWR | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, 65536)
            for k in range(16):
                off = (i * 16 + k) * 65536
                buf[:] = data[off:off + 65536]
                os.pwritev(fd, [buf], off)
        finally:
            os.close(fd)

    in_threads(rw, 4)
    assert m.file.read_bytes() == data
    assert m.unmount() == 0
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}"), "a worker process was left running"
    assert read_back(srv.uri, 4 * MiB) == data
    assert m.stderr.count("write: count=") == 64  # each write answered once, by one process
    assert "2 connection(s), 3 process(es)" in m.stderr


def test_a_dead_worker_stops_the_mount(pynbd_server, fuse_mount) -> None:  # noqa: F811
    srv = pynbd_server("memory", "1M")
    m = fuse_mount(srv.uri, options=["-C", "2"], env={"PYNBD_FUSE_WORKERS": "1"})
    assert _wait_for(lambda: len(_python_children(m)) == 1)
    os.kill(_python_children(m)[0], signal.SIGKILL)
    assert m.wait_exit() == 1
    assert "a worker process exited" in m.stderr
    assert not is_mounted(m.mountpoint)


def test_worker_dies_with_the_main_process(pynbd_server, fuse_mount) -> None:  # noqa: F811
    """SIGKILL of the main process: its worker goes too, so nothing serves a mount nobody
    manages; the file then fails (ENOTCONN) rather than hangs. The fixture unmounts."""
    srv = pynbd_server("memory", "1M")
    m = fuse_mount(srv.uri, options=["-C", "2"], env={"PYNBD_FUSE_WORKERS": "1"})
    assert _wait_for(lambda: len(_python_children(m)) == 1)
    worker = _python_children(m)[0]
    m.proc.kill()
    m.proc.wait()
    assert _wait_for(lambda: not os.path.exists(f"/proc/{worker}")), "the worker outlived it"
    with pytest.raises(OSError) as e:
        m.file.read_bytes()
    assert e.value.errno == errno.ENOTCONN


def test_command_mode_server_stopped(fuse_mount) -> None:  # noqa: F811
    m = fuse_mount("--command", *PYNBD, "serve", "-s", "memory", "2M")
    kids = m.children()
    assert kids, "the server command should be a child of pynbd fuse"
    data = pattern(MiB, 7)
    with open(m.file, "r+b") as f:
        f.write(data)
    assert m.file.read_bytes()[:MiB] == data
    assert m.unmount() == 0
    for pid in kids:
        assert not os.path.exists(f"/proc/{pid}"), "the server command was left running"


def test_socket_activation_pynbd_serve(fuse_mount) -> None:  # noqa: F811
    m = fuse_mount("[", *PYNBD, "serve", "memory", "1M", "]", name="ram")
    assert os.stat(m.file).st_size == MiB
    with open(m.file, "r+b") as f:
        f.write(b"abc")
    assert m.file.read_bytes()[:3] == b"abc"
    kids = m.children()
    assert m.unmount() == 0
    for pid in kids:
        assert not os.path.exists(f"/proc/{pid}")


def test_unix_fd_and_tcp_modes(pynbd_server, fuse_mount) -> None:  # noqa: F811
    import socket

    srv = pynbd_server("pattern", "1M")
    expect = read_back(srv.uri, MiB)
    m = fuse_mount("--unix", srv.sock)
    assert m.file.read_bytes() == expect
    assert m.unmount() == 0
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(srv.sock)
        f = fuse_mount("--fd", str(s.fileno()), pass_fds=[s.fileno()])
    finally:
        s.close()  # pynbd fuse has its own copy
    assert f.file.read_bytes() == expect
    assert f.unmount() == 0
    tcp = pynbd_server("pattern", "1M", tcp=True)
    t = fuse_mount("--tcp", "127.0.0.1", str(tcp.port))
    assert t.file.read_bytes() == expect
    assert t.unmount() == 0


def test_fuse_options(pynbd_server, fuse_mount) -> None:  # noqa: F811
    srv = pynbd_server("memory", "2M")
    data = pattern(2 * MiB, 5)
    d = fuse_mount(srv.uri, options=["-o", "direct_io,allow_other", "-o", "uid=1234,gid=4321",
                                     "-o", "max_readahead=1048576"])
    st = os.stat(d.file)
    assert (st.st_uid, st.st_gid) == (1234, 4321)
    with open(d.file, "r+b") as f:
        f.write(data)
    assert d.file.read_bytes() == data
    with open("/proc/self/mountinfo") as mi:
        line = next(ln for ln in mi if f" {d.mountpoint} " in ln)
    assert "allow_other" in line and "fuse.pynbd" in line
    if os.geteuid() == 0:
        dev = line.split()[2]
        assert Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip() == "1024"
    assert d.unmount() == 0
    k = fuse_mount(srv.uri, options=["-o", "kernel_cache,ro"])
    assert k.file.read_bytes() == data == k.file.read_bytes()
    with pytest.raises(OSError) as e:
        os.open(k.file, os.O_RDWR)
    assert e.value.errno == errno.EROFS  # -o ro: a read-only mount
    assert k.unmount() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_flushes(pynbd_server, fuse_mount, sig) -> None:  # noqa: F811
    srv = pynbd_server("memory", "1M")
    m = fuse_mount(srv.uri)
    with open(m.file, "r+b") as f:
        f.write(b"before the signal")
    m.proc.send_signal(sig)
    assert m.wait_exit() == 0, m.stderr
    assert not is_mounted(m.mountpoint)
    assert read_back(srv.uri, 17) == b"before the signal"
    assert "Traceback" not in m.stderr


def test_background_and_pidfile(pynbd_server, tmp_path) -> None:
    from fuse_helpers import require_fuse

    require_fuse()
    srv = pynbd_server("memory", "1M")
    mp = tmp_path / "mp"
    mp.mkdir()
    pidfile = tmp_path / "pid"
    try:
        r = run_pynbd("fuse", "--background", "-P", pidfile, mp, srv.uri, timeout=30)
        assert r.returncode == 0
        assert is_mounted(mp)  # mounted before the parent returned
        pid = int(pidfile.read_text())
        assert os.path.exists(f"/proc/{pid}")
        assert os.stat(mp / "nbd").st_size == MiB
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{pid}")
    finally:
        if is_mounted(mp):
            subprocess.run(["umount", "-l", str(mp)], check=False)


@pytest.mark.parametrize("connections", ["1", "2"])
def test_background_from_inside_the_mountpoint(pynbd_server, tmp_path, connections) -> None:
    """``cd M && pynbd fuse --background M/disk URI``: the mount answers (nbdfuse does), with
    one process or with worker processes. They all run in ``/``; a relative socket path in
    the URI is relative to where the command ran."""
    from tests.fuse_helpers import require_fuse

    require_fuse()
    srv = pynbd_server("memory", "1M")
    mp = tmp_path / "mp"
    mp.mkdir()
    pidfile = tmp_path / "pid"
    uri = f"nbd+unix:///?socket={os.path.relpath(srv.sock, mp)}"
    try:
        r = subprocess.run([*PYNBD, "fuse", "-C", connections, "--background", "-P",
                            str(pidfile), str(mp / "disk"), uri], cwd=mp, capture_output=True,
                           timeout=30, check=False)
        assert r.returncode == 0, r.stderr
        pid = int(pidfile.read_text())
        st = subprocess.run(["stat", "-c", "%s", str(mp / "disk")], capture_output=True,
                            text=True, timeout=10, check=False)
        assert st.returncode == 0 and st.stdout.strip() == str(MiB), st
        data = pattern(MiB, 5)
        (mp / "disk").write_bytes(data)
        assert (mp / "disk").read_bytes() == data
        procs = [pid, *_python_children_of(pid)]
        assert len(procs) == (1 if connections == "1" else 3)
        for p in procs:
            assert os.readlink(f"/proc/{p}/cwd") == "/"
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)
        assert _wait_for(lambda: not os.path.exists(f"/proc/{pid}"))
        assert read_back(srv.uri, MiB) == data
    finally:
        if is_mounted(mp):
            subprocess.run(["umount", "-l", str(mp)], check=False)


def _python_children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if ppid == pid and b"pynbd" in f.read():
                    out.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return out


def test_server_dies_reader_gets_eio(pynbd_server, fuse_mount) -> None:  # noqa: F811
    srv = pynbd_server("memory", "4M")
    m = fuse_mount(srv.uri, options=["-C", "1"])
    assert len(m.file.read_bytes()) == 4 * MiB
    srv.kill()
    fd = os.open(m.file, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        t = time.monotonic()
        with pytest.raises(OSError) as e:
            os.preadv(fd, [buf], 8192)
        assert e.value.errno == errno.EIO
        assert time.monotonic() - t < 10  # at once (the socket is closed), not a hang
    finally:
        os.close(fd)
    assert m.unmount() == 0
    assert "pynbd fuse: " in m.stderr and "Traceback" not in m.stderr


# ------------------------------------------------------------------------- a filesystem on it
def _loop_devices_work() -> str | None:
    """None when losetup can attach a file here, else why not."""
    if os.geteuid() != 0:
        return "losetup needs root"
    for tool in ("losetup", "mkfs.ext4", "e2fsck", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    r = subprocess.run(["losetup", "-f"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"losetup -f failed: {r.stderr.strip()}"
    return None


def test_loop_mount_ext4_story(pynbd_server, fuse_mount, tmp_path) -> None:  # noqa: F811
    """pynbd serve file disk.img (256M) -> pynbd fuse -> losetup -> mkfs.ext4 -> mount ->
    write files -> unmount everything -> serve disk.img again: the files are there, fsck
    is clean."""
    why = _loop_devices_work()
    if why is not None:
        missing(f"loop devices unusable here: {why}")
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(256 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    payload = os.urandom(3 * MiB)
    srv = pynbd_server("file", img)
    m = fuse_mount(srv.uri)
    loop = subprocess.run(["losetup", "-f", "--show", str(m.file)], check=True,
                          capture_output=True, text=True).stdout.strip()
    mounted = False
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, capture_output=True)
        subprocess.run(["mount", loop, str(mnt)], check=True, capture_output=True)
        mounted = True
        (mnt / "hello.txt").write_text("hello from pynbd fuse\n")
        (mnt / "sub").mkdir()
        (mnt / "sub" / "blob").write_bytes(payload)
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
        mounted = False
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)
    assert m.unmount() == 0
    srv.stop()
    # serve the same image again, read-only, and look through FUSE + a fresh loop device
    srv2 = pynbd_server("-r", "file", img)
    m2 = fuse_mount(srv2.uri)
    fsck = subprocess.run(["e2fsck", "-fn", str(m2.file)], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    loop = subprocess.run(["losetup", "-r", "-f", "--show", str(m2.file)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "ro", loop, str(mnt)], check=True, capture_output=True)
        try:
            assert (mnt / "hello.txt").read_text() == "hello from pynbd fuse\n"
            assert (mnt / "sub" / "blob").read_bytes() == payload
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    assert m2.unmount() == 0


def test_kernel_struct_sizes() -> None:
    """The layouts of include/uapi/linux/fuse.h (protocol 7.31) the channel packs."""
    from pynbd.tools import _fuse_kernel as fk

    assert (fk.IN_HEADER.size, fk.OUT_HEADER.size) == (40, 16)
    assert fk.ATTR.size == 88
    assert (fk.ENTRY_OUT.size, fk.ATTR_OUT.size, fk.OPEN_OUT.size) == (128, 104, 16)
    assert (fk.INIT_OUT.size, fk.STATFS_OUT.size) == (64, 80)
    assert (fk.READ_IN.size, fk.WRITE_IN.size, fk.WRITE_OUT.size) == (40, 40, 8)
    assert (fk.FALLOCATE_IN.size, fk.DIRENT.size) == (32, 24)
    assert fk.READ_BUFFER >= fk.HDR + fk.WRITE_IN.size + fk.MAX_WRITE  # the kernel's minimum
