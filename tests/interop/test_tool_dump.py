"""``pynbd dump`` compared byte for byte with libnbd's nbddump 1.14 on the same servers.

The hexdump is compared as it is. Messages, --help and -V name ``pynbd dump`` where nbddump
names itself: nbddump's are read through `as_pynbd_dump` and the like (that name changed,
every other byte compared)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PYNBD, require, run_peer, run_pynbd, short_tmpdir, start_server

from pynbd import __version__
from pynbd import libnbd as nbd
from pynbd.tools import dump

pytestmark = pytest.mark.interop


def run_peer_path() -> str:
    return require("nbddump")


def as_pynbd_dump(line: str) -> str:
    """An nbddump message as `pynbd dump` words it: the prefix names `pynbd dump`."""
    assert line.startswith("nbddump: "), line
    return "pynbd dump: " + line[len("nbddump: "):]


def as_pynbd_dump_help(usage: str) -> str:
    """nbddump's --help as `pynbd dump`'s: the synopsis and examples run `pynbd dump` and
    the last paragraph points at docs/dump.md; every other line is nbddump's."""
    return usage.replace("\n    nbddump ", "\n    pynbd dump ").replace(
        "\nPlease read the nbddump(1) manual page for full usage.\n",
        "\npynbd dump follows libnbd's nbddump: its options and output.\n"
        "Please read docs/dump.md (or nbddump(1)) for full usage.\n")


def both(*args: str) -> tuple[subprocess.CompletedProcess[bytes],
                              subprocess.CompletedProcess[bytes]]:
    """(nbddump ARGS, pynbd dump ARGS), neither checked."""
    return (run_peer("nbddump", *args, check=False),
            run_pynbd("dump", *args, check=False))


def assert_same(*args: str) -> bytes:
    real, ours = both(*args)
    assert real.returncode == 0, real.stderr
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == real.stdout
    assert ours.stderr == real.stderr == b""
    return real.stdout


# A disk with text, repeated lines, unaligned data, zero runs longer and shorter than the
# zero-skipping threshold, and a size that is not a multiple of 16 (nbdkit's data plugin).
DATA_EXPR = (
    '"hello, world!" @0x1000 1 @0x1010 1 @0x1020 1 @0x2000 "abc"*100 @0x500000 0xff*40000 '
    "@0x600001 ( 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 )*3000 @0x7ffff0 ( 0x7f 0x80 0x20 0x41 )*8"
    ' @0xfffffd "end"'
)
DATA_SIZE = str(0x1000000 + 3)


@pytest.mark.parametrize(
    "args",
    [[], ["--color"], ["--color", "-n", "37"], ["-n", "999"]],
    ids=["plain", "colour", "colour-n37", "n999"],
)
def test_pattern_plugin(nbdkit_server, args: list[str]) -> None:
    srv = nbdkit_server("pattern", "1000")
    assert_same(*args, srv.uri)


def test_pattern_plugin_larger_than_a_read(nbdkit_server) -> None:
    """5 MiB + 7: several 4 MiB reads for pynbd, a 16 MiB one for nbddump; a partial end."""
    srv = nbdkit_server("pattern", str(5 * 1024 * 1024 + 7))
    out = assert_same(srv.uri)
    assert out.count(b"\n") == (5 * 1024 * 1024 + 7 + 15) // 16


@pytest.fixture(scope="module")
def data_disks() -> Iterator[dict[bool, str]]:
    """The DATA_EXPR disk from nbdkit, with base:allocation and without (noextents): URIs."""
    d = short_tmpdir()
    servers = {}
    try:
        for extents in (True, False):
            sock = d / f"{extents}.sock"
            filters = [] if extents else ["--filter=noextents"]
            servers[extents] = start_server(
                [require("nbdkit"), "-f", "-U", sock, *filters, "data", DATA_EXPR,
                 f"size={DATA_SIZE}"], logdir=d / f"{extents}.log", sock=sock)
        yield {k: v.uri for k, v in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    ("args", "extents"),
    [([], True), (["--color"], True), (["--length=4198405"], True),
     (["--colour", "--limit=8200"], True), (["-n", "16777218"], True),
     (["-n", "16777219", "--color"], False)],
    ids=["plain", "colour", "length", "colour-limit", "n-size-1", "noextents-colour-n-size"],
)
def test_data_disk(data_disks: dict[bool, str], args: list[str], extents: bool) -> None:
    assert_same(*args, data_disks[extents])


SHORT_EXTENTS_PLUGIN = """
import nbdkit
API_VERSION = 2
SIZE = 12 * 1024 * 1024 + 3
DATA_AT = 10 * 1024 * 1024 + 5

def open(readonly):
    return 1

def get_size(h):
    return SIZE

def can_extents(h):
    return True

def pread(h, buf, offset, flags):
    start = max(offset, DATA_AT)
    buf[:] = bytes(len(buf))
    if start < offset + len(buf):
        buf[start - offset:] = bytes((i * 7 + i // 4096) % 256
                                     for i in range(start, offset + len(buf)))

def extents(h, count, offset, flags):
    # Less than asked for, and not on line boundaries: the client must ask again.
    if offset < DATA_AT:
        n = min(count, 5 * 1024 * 1024 + 3, DATA_AT - offset)
        return [(offset, n, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)]
    return [(offset, min(count, 1000003), 0)]
"""


def test_server_describing_less_than_asked(nbdkit_server, tmp_path: Path) -> None:
    """Block status answers that cover only part of the range (long and short ones)."""
    plugin = tmp_path / "short_extents.py"
    plugin.write_text(SHORT_EXTENTS_PLUGIN)
    srv = nbdkit_server("python", plugin)
    assert_same(srv.uri)


def test_server_block_size_constraints(nbdkit_server) -> None:
    """A server that refuses requests over 64 KiB or not in 4 KiB units: pynbd dump sizes and
    aligns its requests (nbddump's 16 MiB reads fail there) and shows the same content as
    nbddump shows from an unconstrained server."""
    size = str(1220 * 4096)
    strict = nbdkit_server("--filter=blocksize-policy", "pattern", size,
                           "blocksize-minimum=4096", "blocksize-maximum=65536",
                           "blocksize-error-policy=error")
    plain = nbdkit_server("pattern", size)
    for args in ([], ["-n", "4099"], ["-n", "1000"]):
        expected = run_peer("nbddump", *args, plain.uri).stdout
        assert run_pynbd("dump", *args, strict.uri).stdout == expected


def test_pynbd_memory_disk(pynbd_server) -> None:
    """Both tools against pynbd serve: a memory disk with written data and zero runs."""
    srv = pynbd_server("memory", "3000011")
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    h.pwrite(b"\x01" + bytes(15) + b"\x01", 0)
    h.pwrite(b"The quick brown fox " * 100, 0x12345)
    h.pwrite(bytes(range(256)) * 1024, 0x100000)
    h.pwrite(b"\xff" * 16, 3000011 - 16)
    h.shutdown()
    h.close()
    assert_same(srv.uri)
    assert_same("--color", srv.uri)
    assert_same("-n", "1048577", srv.uri)


def test_bracket_form(nbdkit_server) -> None:
    """``[ CMD ARGS ... ]``: both tools start nbdkit with socket activation."""
    assert_same("--", "[", "nbdkit", "pattern", "1001", "]")
    out = assert_same("--no-color", "--", "[", *PYNBD, "serve", "pattern", "4099", "]")
    assert out.endswith(b"0000001000: 00 00 00                                         "
                        b"|...             |\n")


def test_length_is_parsed_like_nbddump(nbdkit_server) -> None:
    srv = nbdkit_server("pattern", "1000")
    for length in ["1M", " 20", "+5", "-0", "0x10", "18446744073709551621"]:
        assert_same("-n", length, srv.uri)


def test_version_help_and_completion_lists() -> None:
    """Option lists as nbddump's; --help as nbddump's but for the command's name; -V names
    `pynbd dump` and its version, then the libnbd API level, as nbddump's second line."""
    for args in (["-V"], ["--version"], ["--help"], ["--short-options"], ["--long-options"]):
        real, ours = both(*args)
        expected = real.stdout.decode()
        if args == ["--help"]:
            expected = as_pynbd_dump_help(expected)
            assert expected != real.stdout.decode()
        elif args[0] in ("-V", "--version"):
            assert expected.startswith("nbddump 1.14.2\n")
            expected = f"pynbd dump {__version__}\n" + expected.split("\n", 1)[1]
        assert (ours.returncode, ours.stdout.decode()) == (real.returncode, expected), args


@pytest.mark.parametrize(
    "args",
    [["--foo", "nbd://x"], ["--foo=3", "nbd://x"], ["-x", "nbd://x"], ["-n"], ["--length"],
     ["--l", "nbd://x"], ["--help=1"], ["--colour=1", "nbd://x"], ["-n", "abc", "nbd://x"],
     ["--length=", "nbd://x"], ["notauri"], ["nbd+unix:///?socket=/nonexistent/sock"]],
)
def test_bad_command_lines_match(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Same exit status; pynbd's one line is nbddump's first line (nbddump then adds its
    usage text for getopt errors). pynbd's side runs in this process (the e2e tests run it
    as a command)."""
    real = run_peer("nbddump", *args, check=False)
    assert dump.main(args) == real.returncode == 1
    out, err = capsys.readouterr()
    assert out == "" and real.stdout == b""
    mine = err.splitlines()
    assert len(mine) == 1
    # nbddump names itself by argv[0], the absolute path run_peer runs.
    theirs = real.stderr.decode().splitlines()[0].replace(run_peer_path(), "nbddump", 1)
    assert mine[0] == as_pynbd_dump(theirs)


@pytest.mark.parametrize("args", [[], ["nbd://a", "nbd://b"], ["[", "]"]])
def test_missing_or_extra_endpoints(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """nbddump prints only its usage text here; pynbd says what is wrong, in one line."""
    real = run_peer("nbddump", *args, check=False)
    assert dump.main(args) == real.returncode == 1
    assert b"nbddump NBD-URI | [ CMD ARGS ... ]" in real.stderr
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("pynbd dump: ") and err.endswith(" (see pynbd dump --help)\n")
