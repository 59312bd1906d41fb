"""The peers and tools CI installs are here and work, and the server fixtures work with them.

In CI (CI=true) a missing peer fails here, naming its Debian package.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import PEER_PACKAGES, require, run_peer

#: How each tool prints its version (the rest take --version).
VERSION_FLAG = {"nbd-server": "-V", "fusermount3": "-V", "tmux": "-V", "ss": "-V",
                "pgrep": "-V", "mkfs.ext4": "-V", "e2fsck": "-V", "losetup": "-V",
                "mount": "-V", "umount": "-V", "fallocate": "-V", "unshare": "-V"}


@pytest.mark.parametrize("tool", sorted(PEER_PACKAGES))
def test_peer_installed_and_runs(tool: str) -> None:
    """Each one is on PATH and runs: it prints a version (a broken install, a missing
    library or the wrong program of that name does not)."""
    require(tool)
    cp = run_peer(tool, VERSION_FLAG.get(tool, "--version"), timeout=30)
    first = (cp.stdout or cp.stderr).decode(errors="replace").splitlines()[0]
    assert re.search(r"\d+\.\d+", first), f"{tool}: no version in {first!r}"


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
    # twice: the daemon serves one client after another
    assert run_peer("nbdinfo", "--size", srv.uri).stdout.strip() == b"131072"
    assert run_peer("nbdinfo", "--size", srv.uri).stdout.strip() == b"131072"


def _fio(uri: str, *args: str, check: bool = True) -> tuple[int, dict, str]:
    """fio's nbd engine against `uri`: (exit status, the job's JSON report, stderr)."""
    cp = run_peer("fio", "--name=harness", "--ioengine=nbd", f"--uri={uri}",
                  "--verify_state_save=0", "--output-format=json", *args, timeout=60,
                  check=check)
    out = cp.stdout.decode(errors="replace")
    (job,) = json.loads(out[out.index("{"):])["jobs"]
    return cp.returncode, job, cp.stderr.decode(errors="replace")


def test_fio_nbd_engine_verifies(nbdkit_server) -> None:
    """fio's nbd engine (what benchmarks/fio_server.py uses) writes 4 MiB at random to a
    server here and reads every byte back, checking each block's crc32c: what fio verified
    is in its report. Then the check is shown to be real: blocks fio did not write (nbdkit's
    pattern data) fail it."""
    srv = nbdkit_server("memory", "16M")
    rc, job, err = _fio(srv.uri, "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=16M",
                        "--io_size=4M", "--verify=crc32c", "--do_verify=1")
    assert (rc, job["error"]) == (0, 0), err
    assert job["write"]["io_bytes"] == 4 << 20
    assert job["read"]["io_bytes"] == 4 << 20  # the verify pass read back all it wrote
    bad = nbdkit_server("pattern", "1M")
    rc, job, err = _fio(bad.uri, "--rw=read", "--bs=4k", "--size=1M", "--verify=crc32c",
                        check=False)
    assert rc != 0 and job["error"] != 0, err
    assert "verify" in err and "bad magic header" in err, err
