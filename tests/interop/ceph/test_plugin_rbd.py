"""The rbd plugin against a real one-node Ceph cluster (conftest.py): data through qemu-img,
nbdcopy, pynbd copy and libnbd compared with what `rbd export` reads; extents of a sparse
image; a restarted server; an OSD stopped mid-I/O; one-line errors."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import SYSTEM_PYTHON, run_peer, run_pynbd

MiB = 1 << 20


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _serve(pynbd_server, ceph, image: str, *extra: str):
    return pynbd_server("rbd", f"conf={ceph.conf}", image, *extra)


def test_qemu_img_convert_in_and_out(ceph, pynbd_server, tmp_path: Path) -> None:
    image = ceph.new_image(16 * MiB)
    src = tmp_path / "src.raw"
    src.write_bytes(_data(16 * MiB, 1))
    srv = _serve(pynbd_server, ceph, image)
    run_peer("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, srv.uri)
    srv.stop()  # closing the image flushes librbd's cache; rbd export reads the cluster
    assert ceph.export(image, tmp_path / "exported") == src.read_bytes()
    srv = _serve(pynbd_server, ceph, image)
    back = tmp_path / "back.raw"
    run_peer("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, back)
    assert back.read_bytes() == src.read_bytes()


def test_nbdcopy_and_pynbd_copy_between_two_servers(ceph, pynbd_server, tmp_path: Path) -> None:
    a, b, c = (ceph.new_image(8 * MiB) for _ in range(3))
    data = _data(8 * MiB, 2)
    src = tmp_path / "src"
    src.write_bytes(data)
    sa, sb, sc = (_serve(pynbd_server, ceph, x) for x in (a, b, c))
    run_peer("nbdcopy", src, sa.uri)
    # Two copies at once, each between two servers.
    results: dict[str, object] = {}

    def copy(name: str, fn) -> None:
        try:
            results[name] = fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            results[name] = e

    threads = [threading.Thread(target=copy, args=("nbdcopy", lambda: run_peer(
                   "nbdcopy", sa.uri, sb.uri))),
               threading.Thread(target=copy, args=("pynbd copy", lambda: run_pynbd(
                   "copy", sa.uri, sc.uri)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name, r in results.items():
        assert not isinstance(r, BaseException), f"{name}: {r}"
    for srv in (sa, sb, sc):
        srv.stop()
    assert ceph.export(b, tmp_path / "b") == data
    assert ceph.export(c, tmp_path / "c") == data


@pytest.mark.parametrize("zero_copy", [False, True])
def test_writes_in_flight_with_and_without_zero_copy(ceph, pynbd_server, tmp_path: Path,
                                                      zero_copy: bool) -> None:
    """Many WRITEs in flight at once reach the image intact, whether librbd copies their data
    as it takes them (the plugin then writes straight from the server's receive buffer) or,
    as this image's metadata asks, uses the caller's memory until each write is over."""
    image = ceph.new_image(32 * MiB)
    if zero_copy:
        ceph.rbd("image-meta", "set", image, "conf_rbd_disable_zero_copy_writes", "false")
    data = _data(32 * MiB, 5)
    src = tmp_path / "src"
    src.write_bytes(data)
    srv = _serve(pynbd_server, ceph, image)
    run_peer("nbdcopy", "--request-size=262144", "--requests=16", src, srv.uri)
    srv.stop()
    assert ceph.export(image, tmp_path / "exported") == data


def test_sparse_image_shows_its_holes(ceph, pynbd_server, libnbd) -> None:
    image = ceph.new_image(16 * MiB)
    srv = _serve(pynbd_server, ceph, image)
    out = libnbd(
        "import nbd, sys\n"
        "h = nbd.NBD(); h.add_meta_context('base:allocation'); h.connect_uri(sys.argv[1])\n"
        "h.pwrite(b'\\x01' * 65536, 1 << 20)\n"
        "h.pwrite(b'\\x02' * 4096, 9 << 20)\n"
        "h.flush()\n"
        "got = []\n"
        "def cb(ctx, off, ents, err):\n"
        "    for i in range(0, len(ents), 2): got.append((ents[i], ents[i+1]))\n"
        "off = 0\n"
        "while off < h.get_size():\n"
        "    before = len(got)\n"
        "    h.block_status(h.get_size() - off, off, cb)\n"
        "    off += sum(n for n, _ in got[before:])\n"
        "print(got)\n", srv.uri).stdout
    extents = eval(out)
    merged: list[list[int]] = []
    pos = 0
    for length, flags in extents:
        if merged and merged[-1][2] == flags:
            merged[-1][1] += length
        else:
            merged.append([pos, length, flags])
        pos += length
    assert pos == 16 * MiB
    data = [(o, o + n) for o, n, f in merged if f == 0]
    assert all(f in (0, 3) for _, _, f in merged), merged  # holes read as zeroes

    def is_data(start: int, end: int) -> bool:
        return any(a <= start and end <= b for a, b in data)

    def is_hole(start: int, end: int) -> bool:
        return all(end <= a or b <= start for a, b in data)

    # What was written is data; objects (4 MiB) never written are holes. Within an object
    # librbd reports everything up to the last byte written as data.
    assert is_data(1 << 20, (1 << 20) + 65536) and is_data(9 << 20, (9 << 20) + 4096), merged
    assert is_hole((1 << 20) + 65536, 8 << 20) and is_hole((9 << 20) + 4096, 16 << 20), merged


def test_writes_zeroes_trim_fua_multi_conn(ceph, pynbd_server, libnbd, tmp_path: Path) -> None:
    image = ceph.new_image(4 * MiB)
    srv = _serve(pynbd_server, ceph, image)
    libnbd(
        "import nbd, sys\n"
        "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "assert h.can_multi_conn() and h.can_fua() and h.can_trim() and h.can_zero()\n"
        "assert h.can_fast_zero() and h.can_flush() and not h.is_read_only()\n"
        "h.pwrite(b'\\xaa' * (2 << 20), 0, nbd.CMD_FLAG_FUA)\n"
        "h.zero(8192, 4096)\n"                                   # may punch a hole
        "h.zero(8192, 65536, nbd.CMD_FLAG_NO_HOLE)\n"            # allocated zeroes
        "try:\n"
        "    h.zero(4096, 131072, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)\n"
        "    raise SystemExit('a fast allocated zero succeeded')\n"
        "except nbd.Error as e:\n"
        "    assert e.errno == 'ENOTSUP', e\n"
        "h.trim(1 << 20, 1 << 20)\n"
        "h.flush()\n"
        # a second connection sees the first one's writes
        "g = nbd.NBD(); g.connect_uri(sys.argv[1])\n"
        "assert g.pread(4, 4096) == bytes(4) and g.pread(4, 0) == b'\\xaa' * 4\n",
        srv.uri)
    srv.stop()
    got = ceph.export(image, tmp_path / "out")
    assert got[:4096] == b"\xaa" * 4096
    assert got[4096:12288] == bytes(8192)
    assert got[12288:65536] == b"\xaa" * (65536 - 12288)
    assert got[65536:73728] == bytes(8192)
    assert got[73728:1 << 20] == b"\xaa" * ((1 << 20) - 73728)  # the fast zero did nothing
    assert got[1 << 20:] == bytes(3 << 20)  # trimmed, then never written


def test_restarted_server_keeps_the_data(ceph, pynbd_server, libnbd) -> None:
    image = ceph.new_image(4 * MiB)
    srv = _serve(pynbd_server, ceph, image)
    libnbd("import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
           "h.pwrite(b'kept' * 1024, 12288)\n", srv.uri)  # no flush: closing flushes
    srv.stop()
    srv = _serve(pynbd_server, ceph, image)
    out = libnbd("import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
                 "print(h.pread(4096, 12288) == b'kept' * 1024)\n", srv.uri).stdout
    assert out.strip() == "True"


def test_snapshot_is_read_only(ceph, pynbd_server, libnbd) -> None:
    image = ceph.new_image(1 * MiB)
    srv = _serve(pynbd_server, ceph, image)
    libnbd("import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
           "h.pwrite(b'snap' * 1024, 0); h.flush()\n", srv.uri)
    srv.stop()
    ceph.rbd("snap", "create", f"{image}@s1")
    ceph.rbd("bench", "--io-type", "write", "--io-total", "65536", "--io-size", "65536",
             image)  # the head moves on; the snapshot does not
    srv = _serve(pynbd_server, ceph, f"{image}@s1")
    out = libnbd(
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "assert h.is_read_only()\n"
        "try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    print(e.errno)\n"
        "print(h.pread(4096, 0) == b'snap' * 1024)\n", srv.uri).stdout.split()
    assert out == ["EPERM", "True"]


def test_osd_stopped_mid_io_gives_eio_then_serves_again(ceph, pynbd_server, libnbd) -> None:
    """With osd-timeout=3 a request the stopped OSD cannot answer fails with EIO within
    the timeout (plus a margin), the server stays up, and serves again once the OSD is back."""
    image = ceph.new_image(4 * MiB)
    srv = _serve(pynbd_server, ceph, image, "osd-timeout=3")
    script = (
        "import nbd, sys, time\n"
        "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "h.pwrite(b'\\x05' * 65536, 0); h.flush()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"  # the OSD is down now
        "t = time.monotonic()\n"
        "try:\n"
        "    h.pwrite(b'\\x06' * 65536, 65536, nbd.CMD_FLAG_FUA)\n"
        "    print('no error')\n"
        "except nbd.Error as e:\n"
        "    print(e.errno, round(time.monotonic() - t, 1))\n")
    p = subprocess.Popen([SYSTEM_PYTHON, "-c", script, srv.uri], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        ceph.cluster("stop-osd")
        out, err = p.communicate("go\n", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        ceph.cluster("start-osd")
    assert p.returncode == 0, err
    errname, seconds = out.split()
    assert errname == "EIO"
    assert 2.5 <= float(seconds) < 3 + 15  # the OSD timeout, not a hang
    assert srv.proc.poll() is None  # the server is still up
    out = libnbd("import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
                 "h.pwrite(b'\\x07' * 4096, 0, nbd.CMD_FLAG_FUA)\n"
                 "print(h.pread(4096, 0) == b'\\x07' * 4096)\n", srv.uri, timeout=90).stdout
    assert out.strip() == "True"


@pytest.mark.parametrize(("args", "message"), [
    (["rbd/missing"], "rbd: image 'missing' does not exist"),
    (["nopool/x"], "rbd: pool 'nopool' does not exist"),
    (["rbd/x@"], "rbd: image=rbd/x@: expected [POOL/[NAMESPACE/]]IMAGE[@SNAP]"),
    (["a/b/c/d"], "rbd: image=a/b/c/d: expected [POOL/[NAMESPACE/]]IMAGE[@SNAP]"),
    (["timeout=soon", "rbd/x"], "rbd: timeout=soon: expected a number of seconds"),
    (["bogus=1", "rbd/x"], "rbd: unknown parameter 'bogus'"),
    ([], "rbd: you must supply the image parameter"),
])
def test_bad_images_and_parameters(ceph, args: list[str], message: str) -> None:
    cp = run_pynbd("serve", "rbd", f"conf={ceph.conf}", *args, check=False, timeout=60)
    err = cp.stderr.decode()
    assert cp.returncode == 1
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_missing_snapshot_cluster_and_key(ceph, tmp_path: Path) -> None:
    image = ceph.new_image(1 * MiB)
    dead = tmp_path / "dead.conf"
    text = Path(ceph.conf).read_text()
    dead.write_text("\n".join("mon host = v2:127.0.0.1:1" if line.startswith("mon host")
                              else line for line in text.splitlines()) + "\n")
    badkey = tmp_path / "bad.keyring"
    badkey.write_text("[client.admin]\n\tkey = AQBbsm5mAAAAABAAvQ0bWqj2eTyt0ELBmRdsQg==\n")
    cases = [
        ([f"conf={ceph.conf}", f"{image}@nosnap"],
         f"rbd: image '{image.split('/')[1]}' snapshot 'nosnap' does not exist"),
        ([f"conf={dead}", "timeout=2", image],
         "rbd: cannot connect to cluster 'ceph' as client.admin: no monitor answered"),
        ([f"conf={ceph.conf}", f"keyring={badkey}", image],
         ("rbd: cannot connect to cluster 'ceph' as client.admin: the monitors refused the "
         "user's key")),
        ([f"conf={ceph.conf}", f"keyring={tmp_path / 'none'}", image],
         "rbd: cannot connect to cluster 'ceph' as client.admin: no key for the user"),
        ([f"conf={tmp_path / 'none.conf'}", image],
         f"rbd: cannot read Ceph configuration {tmp_path / 'none.conf'}: No such file"),
    ]
    for args, message in cases:
        t = time.monotonic()
        cp = run_pynbd("serve", "rbd", *args, check=False, timeout=60)
        err = cp.stderr.decode()
        assert cp.returncode == 1, err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert time.monotonic() - t < 30, args  # timeout=2 bounds the dead cluster


def test_dump_plugin_and_help() -> None:
    out = run_pynbd("serve", "rbd", "--dump-plugin").stdout.decode()
    assert "name=rbd" in out and "has_extents=1" in out and "has_zero=1" in out
    helptext = run_pynbd("serve", "rbd", "--help").stdout.decode()
    assert "osd-timeout=SECS" in helptext
