"""`pynbd copy` end to end: files, pipes, null:, NBD URIs and `[ CMD ]` against `pynbd serve`.

Most copies call `pynbd.tools.copy.main()` in this process (no interpreter start-up per copy)
with the work range shrunk to 1 MiB, so a few MiB exercise several ranges and both worker
threads; pipes and stdout run as real `pynbd copy` processes.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from copy_helpers import (
    IMAGES,
    data_map,
    make_dense,
    make_mixed,
    make_sparse,
    run_on_terminal,
    sha,
)
from helpers import PYNBD, run_pynbd

import pynbd
import pynbd.tools._copy_run as copy_run
from pynbd.tools import copy as copy_tool
from pynbd.tools._copy_run import zero_runs

MiB = 1 << 20
PYNBD_SERVE = [sys.executable, "-m", "pynbd", "serve"]
E2E_PLUGIN = str(Path(__file__).parent / "plugins" / "e2eplug.py")


@pytest.fixture(autouse=True)
def small_work_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(copy_run, "THREAD_WORK_SIZE", MiB)


def run_copy(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """Call `pynbd copy ARGS` in this process: (status, stdout, stderr)."""
    rc = copy_tool.main([os.fspath(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# ------------------------------------------------------------------------------- images



@pytest.fixture(params=sorted(IMAGES))
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return IMAGES[request.param](tmp_path / f"{request.param}.img")


def size_of(path: Path) -> int:
    return path.stat().st_size


def pattern(size: int) -> bytes:
    """What the pattern plugin serves: each 8-byte word holds its own offset."""
    return b"".join(struct.pack(">Q", o) for o in range(0, size, 8))[:size]


# ------------------------------------------------------------------------------- the command line

BAD = [
    ([], "pynbd copy: missing SOURCE and DESTINATION; try 'pynbd copy --help'"),
    (["a"], "pynbd copy: missing DESTINATION; try 'pynbd copy --help'"),
    (["a", "b", "c"], "pynbd copy: unexpected extra argument 'c'; try 'pynbd copy --help'"),
    (["--bogus", "a", "b"], "pynbd copy: unrecognized option '--bogus'"),
    (["-x", "a", "b"], "pynbd copy: invalid option -- 'x'"),
    (["-C"], "pynbd copy: option requires an argument -- 'C'"),
    (["--connections"], "pynbd copy: option '--connections' requires an argument"),
    (["--s", "a", "b"], ("pynbd copy: option '--s' is ambiguous; possibilities: "
                         "'--short-options' '--sparse' '--synchronous'")),
    (["--flush=1", "a", "b"], "pynbd copy: option '--flush' doesn't allow an argument"),
    (["-p=3", "a", "b"], "pynbd copy: invalid option -- '='"),
    (["-C", "0", "a", "b"], "pynbd copy: --connections: could not parse: 0"),
    (["-C", "x", "a", "b"], "pynbd copy: --connections: could not parse: x"),
    (["-R", "0", "a", "b"], "pynbd copy: --requests: could not parse: 0"),
    (["-T", "x", "a", "b"], "pynbd copy: --threads: could not parse: x"),
    (["--queue-size=x", "a", "b"], "pynbd copy: --queue-size: could not parse: x"),
    (["--request-size=x", "a", "b"], "pynbd copy: --request-size: could not parse: x"),
    (["--request-size=1000", "a", "b"],
     "pynbd copy: --request-size: must be a power of 2 within 4096-33554432"),
    (["--request-size=67108864", "a", "b"],
     "pynbd copy: --request-size: must be a power of 2 within 4096-33554432"),
    (["-S", "100", "a", "b"], "pynbd copy: --sparse: must be a power of 2 and >= 512"),
    (["-S", "1000", "a", "b"], "pynbd copy: --sparse: must be a power of 2 and >= 512"),
    (["-S", "x", "a", "b"], "pynbd copy: --sparse: could not parse: x"),
    (["--progress=-1", "a", "b"], "pynbd copy: --progress: could not parse: -1"),
    (["--progress=x", "a", "b"], "pynbd copy: --progress: could not parse: x"),
    (["--", "[", "nbdkit", "null:"], "pynbd copy: SOURCE '[' has no matching ']'"),
    (["--", "[", "]", "null:"], "pynbd copy: SOURCE '[ ]' has no command"),
    (["--", "a", "[", "x"], "pynbd copy: DESTINATION '[' has no matching ']'"),
]


@pytest.mark.parametrize(("args", "line"), BAD, ids=[" ".join(a) or "none" for a, _ in BAD])
def test_bad_command_line(capsys: pytest.CaptureFixture[str], args: list[str], line: str) -> None:
    rc, out, err = run_copy(capsys, *args)
    assert rc == 1
    assert out == ""
    assert err == line + "\n"


def test_bad_command_line_process_prints_one_line() -> None:
    """Through the real `pynbd copy` entry: one line, status 1, no traceback."""
    cp = run_pynbd("copy", "--sparse=3", "a", "b", check=False)
    assert cp.returncode == 1
    assert cp.stderr == b"pynbd copy: --sparse: must be a power of 2 and >= 512\n"


def test_help_version_and_option_lists(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_copy(capsys, "--help")
    assert (rc, err) == (0, "")
    assert out == copy_tool.USAGE
    assert "SOURCE, DESTINATION := - | FILE | DEVICE | NBD-URI | [ CMD ARGS ... ]" in out
    # The synopsis and examples name the command the user runs; one sentence names nbdcopy.
    assert "\n    pynbd copy [--allocated] [-C N|--connections=N]\n" in out
    assert "\n    pynbd copy -V|--version\n" in out
    assert "\n    pynbd copy nbd://example.com local.img\n" in out
    assert "nbdcopy [" not in out and "    nbdcopy " not in out
    assert "follows libnbd's nbdcopy" in out
    assert run_copy(capsys, "-V") == (0, f"pynbd copy {pynbd.__version__}\nlibnbd 1.14.2\n", "")
    rc, out, _ = run_copy(capsys, "--long-options")
    assert rc == 0 and out.split() == [
        "--help", "--allocated", "--connections", "--destination-is-zero", "--flush",
        "--no-extents", "--progress", "--queue-size", "--request-size", "--requests",
        "--sparse", "--synchronous", "--target-is-zero", "--threads", "--verbose", "--version"]
    rc, out, _ = run_copy(capsys, "--short-options")
    assert rc == 0 and out.split() == ["-C", "-p", "-R", "-S", "-T", "-v", "-V"]


def test_options_after_operands_and_numbers_as_sscanf(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    """getopt permutes: options may follow the operands; %u takes leading digits."""
    src = make_dense(tmp_path / "s.img", MiB)
    rc, _, err = run_copy(capsys, src, tmp_path / "d.img", "-C", "2x", "--requests=8junk",
                          "--sparse", "4096")
    assert (rc, err) == (0, "")
    assert sha(tmp_path / "d.img") == sha(src)


# ------------------------------------------------------------------------------- copies

def test_file_to_file(capsys: pytest.CaptureFixture[str], image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.img"
    assert run_copy(capsys, image, out) == (0, "", "")
    assert sha(out) == sha(image)
    # the destination keeps the source's holes and turns written zero blocks into holes
    assert allocated(out) <= allocated(image)


def test_file_through_pynbd_server_and_back(capsys: pytest.CaptureFixture[str], pynbd_server,
                                            image: Path, tmp_path: Path) -> None:
    srv = pynbd_server("memory", str(size_of(image)))
    assert run_copy(capsys, image, srv.uri) == (0, "", "")
    out = tmp_path / "back.img"
    assert run_copy(capsys, srv.uri, out) == (0, "", "")
    assert sha(out) == sha(image)
    if image.name != "dense.img":
        assert allocated(out) < size_of(image)   # holes and zero blocks stayed holes


def test_over_tcp_with_several_connections(capsys: pytest.CaptureFixture[str], pynbd_server,
                                           tmp_path: Path) -> None:
    """nbd:// URIs: every worker thread connects over TCP (blocking calls) and the bytes
    arrive intact, there and back."""
    image = make_mixed(tmp_path / "m.img")
    srv = pynbd_server("memory", str(size_of(image)), tcp=True)
    assert srv.uri.startswith("nbd://")
    rc, _, err = run_copy(capsys, "-C", "3", "-T", "3", "-v", image, srv.uri)
    assert rc == 0 and "connections=3 " in err
    out = tmp_path / "back.img"
    assert run_copy(capsys, "-C", "3", srv.uri, out) == (0, "", "")
    assert sha(out) == sha(image)


def test_uri_to_uri_with_options(capsys: pytest.CaptureFixture[str], pynbd_server,
                                 tmp_path: Path) -> None:
    image = make_mixed(tmp_path / "m.img")
    n = str(size_of(image))
    a, b = pynbd_server("memory", n), pynbd_server("memory", n)
    assert run_copy(capsys, image, a.uri)[0] == 0
    rc, _, err = run_copy(capsys, "-C", "1", "-R", "3", "--request-size=65536", "-S", "8192",
                          "--queue-size=100000", "--flush", "--no-extents", a.uri, b.uri)
    assert (rc, err) == (0, "")
    out = tmp_path / "o.img"
    assert run_copy(capsys, "--synchronous", b.uri, out)[0] == 0
    assert sha(out) == sha(image)


def test_to_null(capsys: pytest.CaptureFixture[str], pynbd_server, image: Path) -> None:
    assert run_copy(capsys, image, "null:") == (0, "", "")
    srv = pynbd_server("pattern", "3M")
    assert run_copy(capsys, "--allocated", srv.uri, "null:") == (0, "", "")


def test_socket_activated_source_and_destination(capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    out = tmp_path / "pat.img"
    rc, _, err = run_copy(capsys, "--", "[", *PYNBD_SERVE, "pattern", "2M", "]", out)
    assert (rc, err) == (0, "")
    assert out.read_bytes() == pattern(2 * MiB)
    # into a file plugin started the same way, then read back
    dst = tmp_path / "dst.img"
    dst.write_bytes(bytes(2 * MiB))
    rc, _, err = run_copy(capsys, "--flush", "--", out, "[", *PYNBD_SERVE, "file", dst, "]")
    assert (rc, err) == (0, "")
    assert dst.read_bytes() == pattern(2 * MiB)


def test_destination_file_is_replaced_and_resized(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    src = make_sparse(tmp_path / "s.img")
    dst = tmp_path / "d.img"
    dst.write_bytes(os.urandom(9 * MiB))   # larger, full of other data
    assert run_copy(capsys, src, dst)[0] == 0
    assert dst.read_bytes() == src.read_bytes()
    assert data_map(dst) == data_map(src)


def test_sparse_detection_and_allocated(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    src = tmp_path / "s.img"
    blob = bytearray(os.urandom(MiB))
    blob[65536:65536 + 8192] = bytes(8192)      # two written zero blocks
    src.write_bytes(blob)
    sparse, dense, off = tmp_path / "sp.img", tmp_path / "al.img", tmp_path / "s0.img"
    assert run_copy(capsys, src, sparse)[0] == 0
    assert run_copy(capsys, "--allocated", src, dense)[0] == 0
    assert run_copy(capsys, "-S", "0", src, off)[0] == 0
    for f in (sparse, dense, off):
        assert f.read_bytes() == bytes(blob)
    assert data_map(sparse) == [(0, 65536), (65536 + 8192, MiB - 65536 - 8192)]
    assert data_map(dense) == [(0, MiB)]
    assert data_map(off) == [(0, MiB)]


def test_destination_is_zero_skips_zero_ranges(capsys: pytest.CaptureFixture[str], pynbd_server,
                                               tmp_path: Path) -> None:
    srv = pynbd_server("memory", "2M")
    assert run_copy(capsys, "--", "[", *PYNBD_SERVE, "pattern", "2M", "]", srv.uri)[0] == 0
    src = tmp_path / "holes.img"
    with open(src, "wb") as f:
        f.truncate(2 * MiB)
        f.write(b"\xff" * 4096)
    assert run_copy(capsys, "--target-is-zero", src, srv.uri)[0] == 0
    out = tmp_path / "o.img"
    assert run_copy(capsys, srv.uri, out)[0] == 0
    got = out.read_bytes()
    assert got[:4096] == b"\xff" * 4096
    assert got[4096:] == pattern(2 * MiB)[4096:]   # never zeroed: the flag said so
    # without the flag the holes are zeroed
    assert run_copy(capsys, src, srv.uri)[0] == 0
    assert run_copy(capsys, srv.uri, out)[0] == 0
    assert out.read_bytes() == src.read_bytes()


def test_verbose(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = make_dense(tmp_path / "s.img", MiB)
    rc, out, err = run_copy(capsys, "-v", "-T", "1", src, "null:")
    assert (rc, out) == (0, "")
    assert err.splitlines() == [
        f'pynbd copy: src: file_ops "{src}"',
        "pynbd copy: src: size=1048576 (1M), preferred block size=4096",
        'pynbd copy: dst: null_ops "null:"',
        ("pynbd copy: dst: size=9223372036854775807 (9223372036854775807), "
         "preferred block size=4096"),
        "pynbd copy: connections=1 requests=64 threads=1 synchronous=false",
    ]


def test_progress_fd(tmp_path: Path) -> None:
    src = make_dense(tmp_path / "s.img", 3 * MiB)
    r, w = os.pipe()
    try:
        cp = subprocess.run([*PYNBD, "copy", f"--progress={w}", src, "null:"],
                            pass_fds=(w,), capture_output=True, timeout=60, check=False)
        os.close(w)
        w = -1
        lines = os.read(r, 65536).decode()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert cp.returncode == 0, cp.stderr
    assert lines == "0/100\n0/100\n100/100\n"   # nbdcopy: start, first work range, end


def test_progress_bar_on_a_terminal(pynbd_server, tmp_path: Path) -> None:
    """nbdcopy's bar, then the rate and the time left once the copy has run for a while,
    and nbdcopy's final line."""
    srv = pynbd_server(E2E_PLUGIN, "16M", "sleep=0.08")
    rc, screen = run_on_terminal([sys.executable, "-m", "pynbd", "copy", "-p", "-C", "1",
                                  "--no-extents", "--queue-size=1", srv.uri, "null:"])
    assert rc == 0, screen
    frames = screen.split("\r")
    assert frames[0] == "▝   0% [----------------------------------------]"
    bars = [f for f in frames if re.fullmatch(r"\S +\d+% \[\**-*\].*", f)]
    rated = [f for f in bars if re.search(r"\] \d+\.\d (B|KiB|MiB|GiB)/s, \d+:\d\d left", f)]
    assert rated, screen
    assert re.fullmatch(r"█ 100% \[\*{40}\] *", frames[-2]) and frames[-1] == "\n", screen


def test_refuses_to_write_to_a_terminal(tmp_path: Path) -> None:
    src = make_dense(tmp_path / "s.img", 4096)
    rc, screen = run_on_terminal([sys.executable, "-m", "pynbd", "copy", str(src), "-"])
    assert rc == 1
    assert screen == "pynbd copy: refusing to write to tty\r\n"


def test_progress_bar_needs_no_terminal(tmp_path: Path) -> None:
    """-p draws on /dev/tty; without a terminal it draws nothing and the copy works."""
    src = make_dense(tmp_path / "s.img", MiB)
    cp = subprocess.run([*PYNBD, "copy", "-p", src, tmp_path / "o.img"], capture_output=True,
                        timeout=60, check=False, start_new_session=True)
    assert (cp.returncode, cp.stdout, cp.stderr) == (0, b"", b"")
    assert sha(tmp_path / "o.img") == sha(src)


# ------------------------------------------------------------------------------- pipes

def test_pipes(pynbd_server, image: Path, tmp_path: Path) -> None:
    data = image.read_bytes()
    # stdin -> file (the stream's size is unknown: written as it comes)
    out = tmp_path / "from-stdin.img"
    cp = run_pynbd("copy", "-", out, input=data)
    assert sha(out) == sha(image) and cp.stderr == b""
    # file -> stdout, zero ranges written as zero bytes
    cp = run_pynbd("copy", image, "-")
    assert cp.stdout == data
    # stdin -> NBD -> stdout
    srv = pynbd_server("memory", str(len(data)))
    run_pynbd("copy", "--", "-", srv.uri, input=data)
    cp = run_pynbd("copy", srv.uri, "-")
    assert cp.stdout == data


def test_stream_longer_than_the_destination(pynbd_server) -> None:
    small = pynbd_server("memory", "1M")
    cp = run_pynbd("copy", "--", "-", small.uri, input=os.urandom(MiB + 4096), check=False)
    assert cp.returncode == 1
    assert cp.stderr.decode().splitlines()[-1] == (
        f"{small.uri}: nbd_pwrite: request out of bounds: No space left on device")
    cp = run_pynbd("copy", "-", "null:", input=os.urandom(MiB + 4096))
    assert (cp.returncode, cp.stdout, cp.stderr) == (0, b"", b"")


# ------------------------------------------------------------------------------- failures

def test_interrupt_stops_the_copy(pynbd_server) -> None:
    """Ctrl-C (SIGINT) ends a copy at once, both workers included."""
    import signal
    import time

    # 256 reads of 100 ms, at most 8 in flight: over 3 s of copying
    srv = pynbd_server(E2E_PLUGIN, "256M", "sleep=0.1")
    p = subprocess.Popen([*PYNBD, "copy", "--no-extents", srv.uri, "null:"],
                         stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        assert p.poll() is None   # still copying
        p.send_signal(signal.SIGINT)
        # 130 from pynbd copy's handler; death by SIGINT if it came before the handler
        assert p.wait(10) in (130, -signal.SIGINT)
        assert b"Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()


def test_size_mismatch_and_read_only(capsys: pytest.CaptureFixture[str], pynbd_server) -> None:
    big, small = pynbd_server("memory", "2M"), pynbd_server("memory", "1M")
    assert run_copy(capsys, big.uri, small.uri) == (
        1, "", "pynbd copy: error: destination size is smaller than source size\n")
    ro = pynbd_server("-r", "memory", "2M")
    assert run_copy(capsys, big.uri, ro.uri) == (
        1, "", f"pynbd copy: {ro.uri}: the destination is read-only, cannot write to it\n")
    # smaller into larger is fine
    assert run_copy(capsys, small.uri, big.uri)[0] == 0


def test_read_error_fails_the_copy(capsys: pytest.CaptureFixture[str], pynbd_server,
                                   tmp_path: Path) -> None:
    srv = pynbd_server(E2E_PLUGIN, "4M", f"boom_read={2 * MiB}")
    src = make_dense(tmp_path / "s.img", 4 * MiB)
    assert run_copy(capsys, src, srv.uri)[0] == 0     # fill it: extents say data
    out = tmp_path / "o.img"
    rc, _, err = run_copy(capsys, srv.uri, out)
    assert rc == 1
    assert err == f"pynbd copy: read at offset {2 * MiB} failed: Input/output error\n"
    rc, _, err = run_copy(capsys, "--synchronous", srv.uri, "null:")
    assert rc == 1
    assert err == f"{srv.uri}: nbd_pread: read: command failed: Input/output error\n"


def test_write_error_fails_the_copy(capsys: pytest.CaptureFixture[str], pynbd_server,
                                    tmp_path: Path) -> None:
    full = pynbd_server("full", "2M")
    src = make_dense(tmp_path / "s.img", 2 * MiB)
    rc, _, err = run_copy(capsys, src, full.uri)
    assert rc == 1
    assert err.startswith("pynbd copy: write at offset ") and \
        err.endswith(" failed: No space left on device\n")


def test_cannot_open(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_copy(capsys, tmp_path / "nope", "null:") == (
        1, "", f"pynbd copy: {tmp_path / 'nope'}: No such file or directory\n")
    sock = tmp_path / "nothing.sock"
    uri = f"nbd+unix:///?socket={sock}"
    assert run_copy(capsys, uri, "null:") == (
        1, "", f"pynbd copy: {uri}: nbd_connect_uri: connect: No such file or directory\n")
    (tmp_path / "dir").mkdir()
    src = make_dense(tmp_path / "s.img", 4096)
    assert run_copy(capsys, src, tmp_path / "dir") == (
        1, "", f"pynbd copy: {tmp_path / 'dir'}: File exists\n")


# ------------------------------------------------------------------------------- zero detection

def test_zero_runs() -> None:
    S = 4096
    buf = bytearray(os.urandom(16 * S))
    assert zero_runs(buf, len(buf), 0, S) is None
    buf[2 * S:4 * S] = bytes(2 * S)
    assert zero_runs(buf, len(buf), 0, S) == [(0, 2 * S, False), (2 * S, 2 * S, True),
                                              (4 * S, 12 * S, False)]
    # blocks are aligned on the disk, not on the buffer: offset 100 shifts them
    runs = zero_runs(buf, len(buf), 100, S)
    assert runs is not None and [r for r in runs if r[2]] == [(3 * S - 100, S, True)]
    assert sum(n for _, n, _ in runs) == len(buf)
    # a block of data ending in a zero byte is data
    buf2 = bytearray(os.urandom(4 * S))
    buf2[S - 1] = 0
    buf2[2 * S - 1] = 0
    assert zero_runs(buf2, len(buf2), 0, S) is None
    # all zero, and a short unaligned tail stays data
    z = bytearray(3 * S + 10)
    assert zero_runs(z, len(z), 0, S) == [(0, 3 * S, True), (3 * S, 10, False)]
    assert zero_runs(z, 100, 0, S) is None
