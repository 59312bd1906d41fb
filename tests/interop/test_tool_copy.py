"""`pynbd copy` side by side with nbdcopy 1.14 against nbdkit, qemu-nbd and `pynbd serve`.

Both tools get the same command line; the tests compare exit statuses, messages, the bytes
copied and the holes left in the destination. `pynbd copy`'s messages name `pynbd copy` where
nbdcopy names itself, so nbdcopy's stderr is read through `as_pynbd_copy` (that name changed,
every other byte compared). Errors are injected with nbdkit's error filter.
`pynbd copy` runs in this process (`pynbd.tools.copy.main`) unless it needs its own stdout.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from copy_helpers import data_map, make_dense, make_sparse, run_on_terminal, sha
from helpers import PYNBD, peer_env, require, run_peer, run_pynbd

import pynbd
from pynbd.tools import copy as copy_tool

MiB = 1 << 20
PYNBD_SERVE = [sys.executable, "-m", "pynbd", "serve"]
#: nbdkit's own log lines (`nbdkit: PLUGIN.N: error: ...`) mixed into the copy's stderr.
NBDKIT_LOG = re.compile(r"^nbdkit: (\w+\.\d+: |error: |connections\.c)")


def ours(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]) -> tuple[int, str]:
    rc = copy_tool.main([os.fspath(a) for a in args])
    out, err = capsys.readouterr()
    assert out == ""
    return rc, err


def as_pynbd_copy(text: str) -> str:
    """nbdcopy's messages as `pynbd copy` words them: the tool is named `pynbd copy` (the
    line prefix, also where a line starts in the middle of one of nbdkit's, and the hint
    "Try nbdcopy --no-extents"); nothing else changes."""
    return text.replace("nbdcopy: ", "pynbd copy: ").replace("Try nbdcopy ", "Try pynbd copy ")


def theirs(*args: str | os.PathLike[str]) -> tuple[int, str]:
    """nbdcopy with argv[0] "nbdcopy" (getopt names argv[0] in its messages); its stderr
    through `as_pynbd_copy`."""
    cp = subprocess.run(["nbdcopy", *map(os.fspath, args)], executable=require("nbdcopy"),
                        env=peer_env(), capture_output=True, stdin=subprocess.DEVNULL,
                        timeout=60, check=False)
    assert cp.stdout == b""
    return cp.returncode, as_pynbd_copy(cp.stderr.decode())


def as_pynbd_copy_help(usage: str) -> str:
    """nbdcopy's --help as `pynbd copy`'s: the synopsis and examples run `pynbd copy` (the
    synopsis's continuation lines move right with it, without trailing blanks) and the last
    paragraph points at docs/copy.md; every other line is nbdcopy's."""
    lines = []
    for line in usage.split("\n"):
        if line.startswith("    nbdcopy "):
            line = "    pynbd copy " + line[len("    nbdcopy "):]
        elif line.startswith(" " * 12) and line[12] != " ":  # the synopsis continued
            line = "   " + line
        elif line == "Please read the nbdcopy(1) manual page for full usage.":
            line = ("pynbd copy follows libnbd's nbdcopy: its options, output and exit "
                    "statuses.\nPlease read docs/copy.md (or nbdcopy(1)) for full usage.")
        lines.append(line.rstrip(" ").replace("| nbdcopy ", "| pynbd copy "))
    return "\n".join(lines)


def messages(err: str) -> list[str]:
    """The tool's own lines (nbdkit's log lines left out). nbdkit writes to the same stderr,
    so a line of the tool's may start in the middle of one of nbdkit's."""
    out = []
    for line in err.splitlines():
        i = line.find("pynbd copy: ")
        if i > 0:
            line = line[i:]
        if line and not NBDKIT_LOG.match(line):
            out.append(line)
    return out


def _write_mixed(path: Path) -> Path:
    """6 MiB: random data, written zero blocks and runs, holes, an unaligned end. Its size is
    a whole number of 512-byte sectors: qemu-nbd rounds a raw file's size up to one."""
    with open(path, "wb") as f:
        f.truncate(6 * MiB + 512)
        blob = bytearray(os.urandom(2 * MiB))
        for i in range(0, len(blob), 128 * 1024):
            blob[i + 4096:i + 12288] = bytes(8192)
        f.write(blob)
        f.seek(3 * MiB + 4096)
        f.write(os.urandom(MiB))
        f.seek(6 * MiB)
        f.write(os.urandom(512))
    return path


def _write_dense(path: Path) -> Path:
    return make_dense(path, 4 * MiB)


_IMAGES = {"dense": _write_dense, "sparse": make_sparse, "mixed": _write_mixed}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_mixed(tmp_path_factory.mktemp("copy") / "mixed.img")


@pytest.fixture(scope="module", params=sorted(_IMAGES))
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each of dense, sparse and mixed."""
    return _IMAGES[request.param](tmp_path_factory.mktemp("copy") / f"{request.param}.img")


# ----------------------------------------------------------------------------- command line

SAME_LINE = [
    ["--bogus", "a", "b"], ["--no-zero", "a", "b"], ["-x", "a", "b"], ["-C"], ["--connections"],
    ["--s", "a", "b"],
    ["--flush=1", "a", "b"], ["-p=3", "a", "b"], ["-C", "0", "a", "b"], ["-C", "x", "a", "b"],
    ["-R", "0", "a", "b"], ["-T", "x", "a", "b"], ["--queue-size=x", "a", "b"],
    ["--request-size=1000", "a", "b"], ["-S", "100", "a", "b"], ["-S", "x", "a", "b"],
    ["--progress=-1", "a", "b"], ["--progress=x", "a", "b"], ["/nonexistent/x", "null:"],
    ["nbd+unix:///?socket=/nonexistent.sock", "null:"],
]


@pytest.mark.parametrize("args", SAME_LINE, ids=" ".join)
def test_errors_match_nbdcopy(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """Same status; our one line is nbdcopy's first line (nbdcopy adds its usage text)."""
    rc, err = ours(capsys, *args)
    trc, terr = theirs(*args)
    assert rc == trc == 1
    assert err == terr.splitlines()[0] + "\n"


@pytest.mark.parametrize("args", [["--help"], ["-V"], ["--version"], ["--long-options"],
                                  ["--short-options"]], ids=" ".join)
def test_informational_output_matches(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """Option lists as nbdcopy's; --help as nbdcopy's but for the command's name; -V names
    `pynbd copy` and its version, then the libnbd API level, as nbdcopy's second line."""
    rc = copy_tool.main(args)
    out, err = capsys.readouterr()
    cp = run_peer("nbdcopy", *args)
    expected = cp.stdout.decode()
    if args == ["--help"]:
        expected = as_pynbd_copy_help(expected)
    elif args[0] in ("-V", "--version"):
        assert expected.startswith("nbdcopy 1.14.2\n")
        expected = f"pynbd copy {pynbd.__version__}\n" + expected.split("\n", 1)[1]
    assert (rc, out, err) == (cp.returncode, expected, cp.stderr.decode())


# ----------------------------------------------------------------------------- copies

def test_copies_match_nbdcopy(capsys: pytest.CaptureFixture[str], image: Path, tmp_path: Path,
                              nbdkit_server, pynbd_server) -> None:
    """file -> nbdkit -> file, nbdkit -> pynbd serve, [ nbdkit ] -> file: same bytes and
    the same holes as nbdcopy leaves."""
    size = str(image.stat().st_size)
    a, b = nbdkit_server("memory", size), pynbd_server("memory", size)
    assert ours(capsys, image, a.uri) == (0, "")
    assert ours(capsys, a.uri, b.uri) == (0, "")
    mine, nbdcopys = tmp_path / "mine.img", tmp_path / "theirs.img"
    assert ours(capsys, b.uri, mine) == (0, "")
    assert theirs(b.uri, nbdcopys) == (0, "")
    assert sha(mine) == sha(nbdcopys) == sha(image)
    assert data_map(mine) == data_map(nbdcopys)
    # local file to local file
    m2, t2 = tmp_path / "m2.img", tmp_path / "t2.img"
    assert ours(capsys, image, m2) == (0, "")
    assert theirs(image, t2) == (0, "")
    assert sha(m2) == sha(image) and data_map(m2) == data_map(t2)
    # socket activation of nbdkit
    m3, t3 = tmp_path / "m3.img", tmp_path / "t3.img"
    assert ours(capsys, "--", "[", "nbdkit", "pattern", "3M", "]", m3) == (0, "")
    assert theirs("--", "[", "nbdkit", "pattern", "3M", "]", t3) == (0, "")
    assert sha(m3) == sha(t3)


def test_qemu_nbd_both_ways(capsys: pytest.CaptureFixture[str], image: Path, tmp_path: Path,
                            qemu_nbd_server) -> None:
    qimg = tmp_path / "q.img"
    with open(qimg, "wb") as f:
        f.truncate(image.stat().st_size)
    dst = qemu_nbd_server(qimg, "-f", "raw", "-t", "--discard=unmap")
    assert ours(capsys, "--flush", image, dst.uri) == (0, "")
    assert sha(qimg) == sha(image)
    out = tmp_path / "back.img"
    assert ours(capsys, dst.uri, out) == (0, "")
    assert sha(out) == sha(image)
    ref = tmp_path / "ref.img"
    assert theirs(dst.uri, ref) == (0, "")
    assert data_map(out) == data_map(ref)


def test_pipe_output_matches(image: Path, nbdkit_server) -> None:
    srv = nbdkit_server("memory", str(image.stat().st_size))
    run_peer("nbdcopy", image, srv.uri)
    mine = run_pynbd("copy", srv.uri, "-").stdout
    assert mine == run_peer("nbdcopy", srv.uri, "-").stdout == image.read_bytes()


def test_start_up_leaves_out_the_heavy_modules(image: Path, tmp_path: Path,
                                              nbdkit_server) -> None:
    """A copy over several blocking connections loads neither asyncio nor dataclasses
    (with inspect) nor typing: each costs milliseconds of every run's start-up. The copy
    itself is checked byte for byte."""
    srv = nbdkit_server("memory", str(image.stat().st_size))
    run_peer("nbdcopy", image, srv.uri)
    out = tmp_path / "out.img"
    code = ("import sys\n"
            "from pynbd.cli import main\n"
            f"rc = main(['copy', '-v', '-T', '4', {srv.uri!r}, {os.fspath(out)!r}])\n"
            "heavy = ('asyncio', 'dataclasses', 'inspect', 'typing')\n"
            "print(rc, [m for m in heavy if m in sys.modules])\n")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=60, check=False)
    assert cp.stdout == "0 []\n", cp.stderr
    assert "connections=4 " in cp.stderr
    assert out.read_bytes() == image.read_bytes()


@pytest.mark.parametrize("opts", [(), ("-C", "3"), ("-C", "8"), ("-T", "3"), ("-T", "1"),
                                  ("-C", "1", "-T", "4"), ("-C", "3", "-T", "8")])
def test_connections_and_threads_as_nbdcopy(capsys: pytest.CaptureFixture[str], image: Path,
                                            nbdkit_server, opts: tuple[str, ...]) -> None:
    """How many connections and threads a copy uses, by default (a thread per online CPU)
    and when told: nbdcopy's numbers, as -v prints them (connections never more than
    threads; on 2 CPUs, 2 by default, not 4)."""
    srv = nbdkit_server("memory", str(image.stat().st_size))
    rc, err = ours(capsys, "-v", *opts, srv.uri, "null:")
    trc, terr = theirs("-v", *opts, srv.uri, "null:")
    assert rc == trc == 0, (err, terr)
    line = [x for x in err.splitlines() if "connections=" in x]
    assert line == [x for x in terr.splitlines() if "connections=" in x]
    if not opts:
        cpus = os.cpu_count() or 1
        assert line[0].startswith(f"pynbd copy: connections={min(4, cpus)} ")


def test_one_connection_after_all(capsys: pytest.CaptureFixture[str], image: Path,
                                  tmp_path: Path, nbdkit_server) -> None:
    """A source without multi-conn, found out after connecting: the copy goes on with that
    one connection on an event loop (many requests in flight), prints what nbdcopy prints
    with -v, and copies every byte."""
    srv = nbdkit_server("--filter=multi-conn", "memory", str(image.stat().st_size),
                        "multi-conn-mode=disable")
    run_peer("nbdcopy", image, srv.uri)
    out = tmp_path / "out.img"
    out.write_bytes(b"")
    rc, err = ours(capsys, "-v", srv.uri, out)
    trc, terr = theirs("-v", srv.uri, out)
    assert rc == trc == 0
    assert "connections=1 " in err
    assert err.splitlines() == [x for x in terr.splitlines() if not x.startswith("libnbd:")]
    assert out.read_bytes() == image.read_bytes()


def test_zero_fallback_when_the_server_cannot_zero(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path, nbdkit_server) -> None:
    """nbdkit's nozero filter hides WRITE_ZEROES: zero ranges are written as zero bytes."""
    srv = nbdkit_server("--filter=nozero", "memory", "2M")
    run_peer("nbdcopy", "--", "[", "nbdkit", "pattern", "2M", "]", srv.uri)
    holes = tmp_path / "holes.img"
    with open(holes, "wb") as f:
        f.truncate(2 * MiB)
        f.write(b"x" * 5000)
    assert ours(capsys, holes, srv.uri) == (0, "")
    assert run_peer("nbdcopy", srv.uri, "-").stdout == holes.read_bytes()


def test_progress_lines_match(mixed: Path) -> None:
    # the same request size: the synchronous copy reports after each request
    for extra in (["--request-size=262144"], ["--synchronous", "--request-size=262144"]):
        lines = []
        for cmd in (["nbdcopy"], [*PYNBD, "copy"]):
            r, w = os.pipe()
            cp = subprocess.run([*cmd, f"--progress={w}", *extra, mixed, "null:"],
                                pass_fds=(w,), capture_output=True, timeout=60, check=False,
                                env=peer_env())
            os.close(w)
            lines.append(os.read(r, 1 << 16).decode())
            os.close(r)
            assert cp.returncode == 0, cp.stderr
        assert lines[0] == lines[1], extra
        assert lines[0].endswith("100/100\n")


def test_terminal_bar_matches(mixed: Path) -> None:
    """A short copy draws what nbdcopy draws on the terminal: the bar at 0% twice (start,
    first work range), then the final line."""
    screens = []
    for argv in ([require("nbdcopy")], [sys.executable, "-m", "pynbd", "copy"]):
        rc, screen = run_on_terminal([*argv, "-p", str(mixed), "null:"])
        assert rc == 0, screen
        frames = screen.split("\r")
        # (on a loaded machine a rate may have been drawn: the final line then wipes it)
        screens.append([*frames[:2], frames[-2].rstrip(" "), frames[-1]])
    assert screens[0] == screens[1]
    assert screens[0][0] == "▝   0% [----------------------------------------]"


def test_verbose_matches(capsys: pytest.CaptureFixture[str], mixed: Path) -> None:
    for args in (["-T", "2"], ["--synchronous"]):
        rc, err = ours(capsys, "-v", *args, mixed, "null:")
        trc, terr = theirs("-v", *args, mixed, "null:")
        assert rc == trc == 0
        assert err.splitlines() == [x for x in terr.splitlines() if not x.startswith("libnbd:")]


# ----------------------------------------------------------------------------- failures

ERRORS = {
    "pread": (["[", "nbdkit", "--filter=error", "pattern", "4M", "error-pread-rate=1", "]",
               "null:"]),
    "pread-sync": (["[", "nbdkit", "--filter=error", "pattern", "4M",
                    "error-pread-rate=1", "]", "null:"]),
    "pwrite": (["[", "nbdkit", "pattern", "4M", "]", "[", "nbdkit", "--filter=error", "memory",
                "4M", "error-pwrite-rate=1", "]"]),
    "zero": (["[", "nbdkit", "memory", "4M", "]", "[", "nbdkit", "--filter=error", "memory",
              "4M", "error-zero-rate=1", "]"]),
    "extents": (["[", "nbdkit", "--filter=error", "memory", "4M", "error-extents-rate=1", "]",
                 "null:"]),
    "size": (["[", "nbdkit", "memory", "2M", "]", "[", "nbdkit", "memory", "1M", "]"]),
    "read-only": (["[", "nbdkit", "memory", "1M", "]", "[", "nbdkit", "-r", "memory", "1M", "]"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_failures_match_nbdcopy(capsys: pytest.CaptureFixture[str], case: str) -> None:
    """Every failed read, write, zero or block status fails the copy with nbdcopy's
    message and status; never a silent success (CVE-2022-0485)."""
    require("nbdkit")
    args = ["--synchronous"] if case.endswith("-sync") else []
    args += ["--", *ERRORS[case]]
    rc, err = ours(capsys, *args)
    trc, terr = theirs(*args)
    assert rc == trc == 1
    # requests complete in any order: the failing offset may differ
    def norm(lines: list[str]) -> list[str]:
        return [re.sub(r"at offset \d+", "at offset N", x) for x in lines]

    assert norm(messages(err)) == norm(messages(terr))[:1]


URI_ERRORS = {
    "pread": (("--filter=error", "pattern", "4M", "error-pread-rate=1"), None),
    "pwrite": (("pattern", "4M"), ("--filter=error", "memory", "4M", "error-pwrite-rate=1")),
    "zero": (("memory", "4M"), ("--filter=error", "memory", "4M", "error-zero-rate=1")),
    "extents": (("--filter=error", "memory", "4M", "error-extents-rate=1"), None),
}


@pytest.mark.parametrize("case", sorted(URI_ERRORS))
def test_failures_over_several_connections(capsys: pytest.CaptureFixture[str], nbdkit_server,
                                           case: str) -> None:
    """The same failures on servers that allow multi-conn, reached by URI: the copy runs
    one thread per connection in blocking calls, and still fails with nbdcopy's message
    and status. Each tool gets servers of its own."""
    src_args, dst_args = URI_ERRORS[case]
    results = []
    for tool in (ours, theirs):
        src = nbdkit_server(*src_args)
        dst = nbdkit_server(*dst_args) if dst_args else None
        args = ["-C", "4", "-T", "4", src.uri, dst.uri if dst else "null:"]
        results.append(tool(capsys, *args) if tool is ours else tool(*args))
        for s in (src, dst):
            if s is not None:
                s.stop(check=False)  # nbdkit 1.32 may abort when a client hangs up early
    (rc, err), (trc, terr) = results
    assert rc == trc == 1

    def norm(lines: list[str]) -> list[str]:
        return [re.sub(r"at offset \d+", "at offset N", re.sub(r"nbdkit\d+\.sock", "S", x))
                for x in lines]

    assert norm(messages(err)) == norm(messages(terr))[:1]


FAIL_WRITES_FROM_PLUGIN = """
import errno
import nbdkit

API_VERSION = 2
FAIL_FROM = 2 * 1024 * 1024
disk = bytearray(4 * 1024 * 1024)

def open(readonly):
    return 1

def get_size(h):
    return len(disk)

def can_multi_conn(h):
    return True

def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]

def pwrite(h, buf, offset, flags):
    if offset + len(buf) > FAIL_FROM:
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, "this part of the disk fails")
    disk[offset:offset + len(buf)] = buf
"""


def test_failed_write_reported_at_its_offset(capsys: pytest.CaptureFixture[str],
                                            nbdkit_server, tmp_path: Path) -> None:
    """With several connections a write's reply is collected while the next piece is read:
    a failure is still reported at the offset of the write that failed."""
    plugin = tmp_path / "fail_writes.py"
    plugin.write_text(FAIL_WRITES_FROM_PLUGIN)
    dst = nbdkit_server("python", plugin)
    src = tmp_path / "src.img"
    src.write_bytes(bytes(range(256)) * (16 * 1024))  # 4 MiB, no zero block
    rc, err = ours(capsys, "-C", "2", "-T", "2", "-v", src, dst.uri)
    assert rc == 1
    assert "connections=2 " in err
    assert messages(err)[-1] == ("pynbd copy: write at offset 2097152 failed: "
                                 "Input/output error")
    dst.stop(check=False)


SLOW_FOURTH_OPEN_PLUGIN = """
import threading
import time

API_VERSION = 2
opened = 0
lock = threading.Lock()

def open(readonly):
    global opened
    with lock:
        opened += 1
        n = opened
    if n == 4:
        time.sleep(1.5)
    return n

def get_size(h):
    return 8 * 1024 * 1024

def can_multi_conn(h):
    return True

def pread(h, buf, offset, flags):
    buf[:] = bytes(len(buf))
"""


def test_every_connection_opens_before_data_moves(capsys: pytest.CaptureFixture[str],
                                                 nbdkit_server, tmp_path: Path) -> None:
    """As nbdcopy, the copy connects all of its connections before it reads: the source's
    fourth connection takes 1.5 s to open, and no read reaches the source before it has."""
    plugin = tmp_path / "slow_open.py"
    plugin.write_text(SLOW_FOURTH_OPEN_PLUGIN)
    log = tmp_path / "src.log"
    src = nbdkit_server("--filter=log", "python", plugin, f"logfile={log}")
    rc, err = ours(capsys, "-C", "4", "-T", "4", src.uri, "null:")
    assert rc == 0, err
    src.stop()
    lines = log.read_text().splitlines()
    connects = [i for i, line in enumerate(lines) if " Connect " in line]
    reads = [i for i, line in enumerate(lines) if " Read " in line]
    assert len(connects) == 4 and reads, lines
    assert max(connects) < min(reads), lines


def most_in_flight(log: Path, command: str) -> dict[str, int]:
    """The most ``command`` requests (Read, Write) nbdkit's log shows at once, by
    connection."""
    inside: dict[str, int] = {}
    most: dict[str, int] = {}
    for line in log.read_text().splitlines():
        m = re.search(rf"connection=(\d+) (\.\.\.)?{command} id=", line)
        if m:
            conn = m.group(1)
            inside[conn] = inside.get(conn, 0) + (-1 if m.group(2) else 1)
            most[conn] = max(most.get(conn, 0), inside[conn])
    return most


def test_two_reads_in_flight_per_connection(nbdkit_server, tmp_path: Path) -> None:
    """Each blocking connection sends the next piece's read before it waits for the reply
    to the one in hand: the server (nbdkit's log, reads delayed 50 ms) sees two reads at
    once on a connection, never more; the copy is byte for byte."""
    log = tmp_path / "src.log"
    size = 4 * 1024 * 1024
    src = nbdkit_server("--filter=log", "--filter=delay", "pattern", str(size),
                        "rdelay=50ms", f"logfile={log}")
    out = tmp_path / "out.img"
    cp = subprocess.run([*PYNBD, "copy", "-C", "2", "-T", "2", "--request-size=262144",
                         src.uri, out], capture_output=True, text=True, timeout=60,
                        check=False)
    assert cp.returncode == 0, cp.stderr
    src.stop()
    most = most_in_flight(log, "Read")
    assert most and set(most.values()) == {2}, most
    assert out.read_bytes() == b"".join(struct.pack(">Q", o) for o in range(0, size, 8))


def test_two_writes_behind_per_connection(nbdkit_server, tmp_path: Path) -> None:
    """A blocking connection waits for a write's reply only when two are owed: the
    destination (writes delayed 50 ms) sees two writes at once on a connection, never
    more; every byte arrives."""
    image = tmp_path / "src.img"
    image.write_bytes(bytes(range(1, 256)) * (4 * 1024 * 1024 // 255 + 1))
    size = image.stat().st_size
    log = tmp_path / "dst.log"
    dst = nbdkit_server("--filter=log", "--filter=delay", "memory", str(size),
                        "wdelay=50ms", f"logfile={log}")
    cp = subprocess.run([*PYNBD, "copy", "-C", "2", "-T", "2", "--request-size=262144",
                         image, dst.uri], capture_output=True, text=True, timeout=60,
                        check=False)
    assert cp.returncode == 0, cp.stderr
    back = tmp_path / "back.img"
    run_peer("nbdcopy", dst.uri, back)
    dst.stop()
    most = most_in_flight(log, "Write")
    assert most and set(most.values()) == {2}, most
    assert back.read_bytes() == image.read_bytes()


def test_server_killed_mid_copy(nbdkit_server, tmp_path: Path) -> None:
    """The source dies while the copy waits on it (a read in flight, delayed 2 s; a 64 MiB
    disk is one work range, so one of the four threads reads): the copy fails at once with
    a message, no thread left hanging."""
    import time

    log = tmp_path / "src.log"
    src = nbdkit_server("--filter=log", "--filter=delay", "pattern", "64M", "rdelay=2",
                        f"logfile={log}")
    dst = nbdkit_server("memory", "64M")
    p = subprocess.Popen([*PYNBD, "copy", "-C", "4", "-T", "4", src.uri, dst.uri],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            text = log.read_text() if log.exists() else ""
            if " Read id=" in text:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"the copy did not start reading: {p.poll()}")
        src.proc.kill()
        t = time.monotonic()
        _, err = p.communicate(timeout=60)
        assert time.monotonic() - t < 10
        assert p.returncode == 1, err
        assert re.fullmatch(r"pynbd copy: read at offset \d+ failed: Input/output error\n",
                            err), err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    src.stop(check=False)


def test_partial_read_errors_fail(capsys: pytest.CaptureFixture[str], mixed: Path) -> None:
    """One read in ten fails: the copy fails, whatever the order of completions. (A server
    started for this copy only: nbdkit 1.32 can abort when a client hangs up with replies
    still to send, after nbdcopy's failures too.)"""
    rc, err = ours(capsys, "-S", "0", "--request-size=65536", "--", "[", "nbdkit",
                   "--filter=error", "file", mixed, "error-pread-rate=0.1", "error-pread=EIO",
                   "]", "null:")
    assert rc == 1
    assert re.fullmatch(r"pynbd copy: read at offset \d+ failed: Input/output error\n", err)
