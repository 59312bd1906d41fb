"""The peers CI installs are here and the server fixtures work with them.

In CI (CI=true) a missing peer fails here, naming its Debian package.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import PEER_PACKAGES, require, run_peer


@pytest.mark.parametrize("tool", sorted(PEER_PACKAGES))
def test_peer_installed(tool: str) -> None:
    require(tool)


def test_nbdkit_server_unix(nbdkit_server) -> None:
    srv = nbdkit_server("memory", "1M")
    assert srv.uri.startswith("nbd+unix:///?socket=/tmp/")
    assert run_peer("nbdinfo", "--size", srv.uri).stdout.strip() == b"1048576"


def test_nbdkit_server_tcp(nbdkit_server) -> None:
    srv = nbdkit_server("-r", "pattern", "64K", tcp=True)
    assert srv.uri.startswith("nbd://127.0.0.1:")
    assert run_peer("nbdinfo", "--size", srv.uri).stdout.strip() == b"65536"


def test_nbdsh_finds_libnbd(nbdkit_server) -> None:
    # nbdsh runs `python3 -mnbd`: must be the system python, not the venv's.
    srv = nbdkit_server("memory", "1M")
    out = run_peer("nbdsh", "-u", srv.uri, "-c", "print(h.get_size())").stdout
    assert out.strip() == b"1048576"


def test_libnbd_python(nbdkit_server, libnbd) -> None:
    srv = nbdkit_server("memory", "1M")
    script = (
        "import nbd, sys\n"
        "h = nbd.NBD()\n"
        "h.connect_uri(sys.argv[1])\n"
        "h.pwrite(b'hello', 4096)\n"
        "print(h.get_size(), h.pread(5, 4096).decode())\n"
    )
    assert libnbd(script, srv.uri).stdout.split() == ["1048576", "hello"]


def test_qemu_nbd_server(qemu_nbd_server, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * 65536)
    srv = qemu_nbd_server(image, "-f", "raw", "-t")
    out = run_peer("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 64k", srv.uri).stdout
    assert b"read 65536/65536" in out


def test_nbd_server(nbd_server, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x01" * 131072)
    srv = nbd_server(image, export="disk")
    assert srv.uri == f"nbd+unix:///disk?socket={srv.sock}"
    assert run_peer("nbdinfo", "--size", srv.uri).stdout.strip() == b"131072"
    assert run_peer("nbdinfo", "--size", srv.uri).stdout.strip() == b"131072"


def test_fio_nbd_engine(nbdkit_server) -> None:
    """fio's nbd engine (what benchmarks/fio_server.py uses) talks to a server here."""
    srv = nbdkit_server("memory", "16M")
    cp = run_peer(
        "fio",
        "--name=smoke",
        "--ioengine=nbd",
        f"--uri={srv.uri}",
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=8",
        "--size=16M",
        "--io_size=4M",
        "--output-format=terse",
        timeout=60,
    )
    assert cp.returncode == 0
