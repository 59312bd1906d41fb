"""The luks filter side by side with nbdkit's, on LUKSv1 images made by cryptsetup and by
qemu-img: bytes read, the encrypted bytes left in the image after the same writes (byte for
byte), flags and block sizes, disks that do not open, bad parameters, and composition with
the offset filter."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import require
from tests.interop.shape_compare import (
    Factory,
    assert_same_many,
    assert_same_open,
    bad_params,
    infos,
)
from tests.side_by_side import probe

MiB = 1 << 20
SECRET = "correct horse"


def _cryptsetup(path: Path, size: int, key: Path, *opts: str) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run([require("cryptsetup"), "luksFormat", "-q", "--key-file", key,
                    "--pbkdf-force-iterations", "1000", *opts, path], check=True,
                   capture_output=True)
    return path


def _qemu(path: Path) -> Path:
    """qemu-img measures PBKDF2's speed from its own CPU time; on a loaded machine that
    measurement sometimes fails ("Unable to get accurate CPU usage"): then again."""
    for _ in range(3):
        cp = subprocess.run([require("qemu-img"), "create", "-q", "-f", "luks", "--object",
                             f"secret,data={SECRET},id=sec0", "-o",
                             "key-secret=sec0,iter-time=10", path, "1M"],
                            check=False, capture_output=True, text=True)
        if "accurate CPU usage" not in cp.stderr:
            break
    assert cp.returncode == 0, cp.stderr
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """cryptsetup's default LUKSv1 (aes-xts-plain64, 512-bit key, sha256), AES-256-CBC with
    plain IVs and sha1, qemu-img's luks format, and some that do not open (made at the
    same time: qemu-img spends seconds measuring PBKDF2)."""
    d = tmp_path_factory.mktemp("luks")
    key = d / "key"
    key.write_text(SECRET)
    luks1 = ("--type", "luks1")
    with ThreadPoolExecutor(2) as pool:
        qemu = pool.submit(_qemu, d / "qemu.img")
        out = {
            "xts": _cryptsetup(d / "xts.img", 3 * MiB, key, *luks1),
            "cbc": _cryptsetup(d / "cbc.img", 3 * MiB, key, *luks1, "--cipher",
                               "aes-cbc-plain", "--key-size", "256", "--hash", "sha1"),
            "essiv": _cryptsetup(d / "essiv.img", 3 * MiB, key, *luks1, "--cipher",
                                 "aes-cbc-essiv:sha256", "--key-size", "256"),
            "luks2": _cryptsetup(d / "luks2.img", 20 * MiB, key, "--type", "luks2", "--pbkdf",
                                 "pbkdf2"),
            "key": key,
        }
        out["qemu"] = qemu.result()
    return out


_OPS = [("size",), ("pread", 4096, 0), ("pread", 1024, 512),
        ("pwrite", bytes(range(256)) * 8, 4096), ("pwrite", b"\x11" * 1536, 512),
        ("pwrite", b"\x22" * 5120, 10240), ("pwrite", b"\x44" * 512, 25088, 1),
        ("zero", 3072, 30208), ("trim", 4096, 40960), ("cache", 8192, 0),
        ("extents", 65536, 0), ("flush",), ("pread", 40960, 0)]


def test_reads_and_writes(pynbd_server: Factory, nbdkit_server: Factory,
                          images: dict[str, Path]) -> None:
    """The same reads decrypt to the same bytes, and the same writes leave the same
    encrypted bytes in the image (the copies are compared after)."""
    key = f"passphrase=+{images['key']}"
    views = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=luks", "file", images[k], key], _OPS, [images[k]])
        for k in ("xts", "cbc", "qemu")])
    for view in views:
        # trim is not offered: libnbd refuses it itself
        assert [r[0] for r in view["results"]] == ["size", "data", "data"] + ["ok"] * 5 + [
            "error", "ok", "extents", "ok", "data"], view["results"]
        got = view["results"][-1][1]
        assert got[4096:6144] == bytes(range(256)) * 8 and got[512:2048] == b"\x11" * 1536
        assert got[10240:15360] == b"\x22" * 5120 and got[30208:33280] == bytes(3072)
    assert views[0]["size"] == 3 * MiB - 4096 * 512  # the payload of cryptsetup's image


def test_partial_sectors(pynbd_server: Factory, nbdkit_server: Factory,
                         images: dict[str, Path], tmp_path: Path) -> None:
    """Requests not aligned to sectors reach the luks filter through the offset filter
    above it (clients are told the minimum block is 512 bytes). Reads match nbdkit's.
    Writes of partial sectors are read, decrypted, patched, encrypted and written back;
    nbdkit 1.32 patches the plain bytes into the sector without decrypting it first, so
    the rest of the sector turns to garbage: pynbd's writes are checked against what was
    there before, and nbdkit then reads pynbd's image back the same."""
    key = f"passphrase=+{images['key']}"
    args = ["--filter=offset", "--filter=luks", "file", images["cbc"], key, "offset=100",
            "range=100000"]
    assert_same_many(pynbd_server, nbdkit_server, [
        (args, [("pread", 4096, 0), ("pread", 1024, 512 * 99)])])
    disk = tmp_path / "disk.img"
    disk.write_bytes(images["cbc"].read_bytes())
    srv = pynbd_server(*args[:3], disk, *args[4:])
    view = probe(srv.uri, [("pread", 4096, 0), ("pwrite", b"\x66" * 1024, 0),
                           ("pwrite", b"\x77" * 512, 1536), ("zero", 1024, 2048),
                           ("pread", 4096, 0)])
    srv.stop()
    want = bytearray(view["results"][0][1])
    want[0:1024], want[1536:2048], want[2048:3072] = b"\x66" * 1024, b"\x77" * 512, bytes(1024)
    assert view["results"][1:] == [["ok"]] * 3 + [["data", bytes(want)]]
    theirs = nbdkit_server("--filter=luks", "file", disk, key)
    back = probe(theirs.uri, [("pread", 4608, 0)])["results"][0][1]
    assert back[100:4196] == bytes(want)


def test_nbdinfo(pynbd_server: Factory, nbdkit_server: Factory,
                 images: dict[str, Path]) -> None:
    key = f"passphrase=+{images['key']}"
    cases = [["--filter=luks", "file", images["xts"], key],
             ["-r", "--filter=luks", "file", images["qemu"], key]]
    for mine, theirs in infos(pynbd_server, nbdkit_server, cases):
        for k in ("export-size", "is_read_only", "can_zero", "can_fast_zero", "can_trim",
                  "can_cache", "can_fua", "can_flush", "can_multi_conn",
                  "block_size_minimum", "block_size_preferred", "contexts"):
            assert mine.get(k) == theirs.get(k), k
        assert mine["block_size_minimum"] == 512


def test_disks_that_do_not_open(images: dict[str, Path], tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(MiB))
    small = tmp_path / "small.img"
    small.write_bytes(images["xts"].read_bytes()[:8192])
    key = f"passphrase=+{images['key']}"
    crafted = []
    good = images["xts"].read_bytes()
    # (offset, bytes) in the header: master key iterations, a key slot's iterations,
    # its active flag, the payload offset, the master key length
    for i, (at, value) in enumerate([(164, 0), (212, 0), (208, 1), (104, 999999),
                                     (108, 2000)]):
        path = tmp_path / f"crafted{i}.img"
        path.write_bytes(good[:at] + value.to_bytes(4, "big") + good[at + 4:])
        crafted.append(["--filter=luks", "file", path, key])
    sizes = assert_same_open(crafted + [
        ["--filter=luks", "file", images["xts"], "passphrase=wrong"],
        ["--filter=luks", "file", images["qemu"], "passphrase=wrong"],
        ["--filter=luks", "file", zeros, key],
        ["--filter=luks", "file", small, key],
        ["--filter=luks", "file", images["essiv"], key],
        ["--filter=luks", "file", images["luks2"], key],
        ["--filter=luks", "file", images["qemu"], f"passphrase={SECRET}"],
    ])
    assert sizes == [None] * 11 + [MiB]


def test_bad_parameters(images: dict[str, Path]) -> None:
    bad_params([
        ["--filter=luks", "null"],
        ["--filter=luks", "null", "passphrase=+/nonexistent/key"],
        ["--filter=luks", "null", "passphrase=-1"],
        ["--filter=luks", "null", "passphrase=-"],
        ["--filter=luks", "null", "passphrase=-99"],
    ])


def test_inside_a_larger_disk(pynbd_server: Factory, nbdkit_server: Factory,
                              images: dict[str, Path], tmp_path: Path) -> None:
    """A LUKS volume 1 MiB into a disk: the offset filter below the luks filter."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xee" * MiB + images["cbc"].read_bytes() + b"\xee" * 4096)
    key = f"passphrase=+{images['key']}"
    view, = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=luks", "--filter=offset", "file", disk, key, "offset=1M",
          f"range={3 * MiB}"], [("pwrite", b"hello" * 512, 512), ("pread", 4096, 0)], [disk])])
    assert view["results"][1][1][512:3072] == b"hello" * 512


def test_partial_sector_write_with_fua(pynbd_server: Factory, images: dict[str, Path],
                                       tmp_path: Path) -> None:
    """A write of partial sectors with FUA (through the offset filter): the read of the
    sector has no flags, the write keeps FUA. nbdkit 1.32 passes the write's flags to the
    read and aborts on an assertion (backend_pread: flags == 0): pynbd's alone."""
    disk = tmp_path / "xts.img"
    disk.write_bytes(images["xts"].read_bytes())
    srv = pynbd_server("--filter=offset", "--filter=luks", "file", disk,
                       f"passphrase={SECRET}", "offset=20")
    view = probe(srv.uri, [("pread", 1024, 0), ("pwrite", b"\x55" * 512, 512, 1),
                           ("pread", 1024, 0)])
    before = view["results"][0][1]
    assert view["results"][1:] == [["ok"], ["data", before[:512] + b"\x55" * 512]]
