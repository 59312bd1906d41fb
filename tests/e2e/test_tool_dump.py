"""``pynbd dump`` (nbddump) against ``pynbd serve``: output, squashing, colours, -n, bad input.

Expected output comes from `reference_dump`, a line-by-line transcription of nbddump 1.14's
``do_dump`` (dump/dump.c), independent of the bulk formatting in pynbd.tools.dump.
"""

from __future__ import annotations

import io
import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import PYNBD, peer_env, run_pynbd

from pynbd import __version__
from pynbd import libnbd as nbd
from pynbd.tools import dump

# ----------------------------------------------------------------------------- the reference

_GREEN, _GREY, _BLUE = "\033[22;32m", "\033[22;90m", "\033[1;34m"
_RED, _MAGENTA, _RESTORE = "\033[1;31m", "\033[1;35m", "\033[0m"


def reference_dump(disk: bytes, limit: int | None = None, colour: bool = False, *,
                   base: int = 0, disk_size: int | None = None) -> bytes:
    """nbddump's output for a disk holding `disk`, line by line and byte by byte as in C.

    With `base`, `disk` is the part of a `disk_size`-byte disk starting there, and the line
    before it is taken as different from its first line."""
    size = len(disk)
    count = size if limit is None else min(size, limit)
    disk_size = size + base if disk_size is None else disk_size
    splat, pipe, dot = ("☆", "│", "·") if colour else ("*", "|", ".")

    def c(code: str) -> str:
        return code if colour else ""

    out: list[str] = []
    last = b""
    printed_splat = False
    for i in range(0, count, 16):
        n = min(16, count - i)
        line = disk[i : i + n] + bytes(16 - n)  # C pads the buffer with zeroes
        if base + i > 0 and base + i + 16 < disk_size and line == last:
            if not printed_splat:
                out.append(splat + "\n")
                printed_splat = True
            continue
        printed_splat = False
        last = line
        out.append(c(_GREEN) + f"{base + i:010x}" + c(_GREY) + ": ")
        for j in range(n):
            out.append((c(_BLUE) if line[j] else c(_GREY)) + f"{line[j]:02x} ")
            if j == 7:
                out.append(" ")
        out.append(c(_GREY))
        for j in range(n, 16):
            out.append("   " + (" " if j == 7 else ""))
        out.append(pipe)
        for j in range(n):
            ch = chr(line[j])
            if ch.isascii() and ch.isalnum():
                out.append(c(_RED) + ch)
            elif 0x20 <= line[j] < 0x7F:
                out.append(c(_MAGENTA) + ch)
            else:
                out.append(c(_GREY) + dot)
        out.append(c(_GREY) + " " * (16 - n) + pipe + "\n" + c(_RESTORE))
    return "".join(out).encode()


def pattern(size: int) -> bytes:
    """The content of the pattern plugin: each 8-byte word holds its own offset (big endian)."""
    return b"".join(i.to_bytes(8, "big") for i in range(0, size + 7, 8))[:size]


# ----------------------------------------------------------------------------- formatting


def _random_disk(rng: random.Random, size: int) -> bytes:
    disk = bytearray(size)
    for _ in range(rng.randint(0, 5)):
        if size == 0:
            break
        at = rng.randrange(size)
        kind = rng.choice(["text", "repeat", "byte", "random"])
        if kind == "text":
            chunk = b"hello, world! \x00\x7f\x80\xff ~" * rng.randint(1, 3)
        elif kind == "repeat":
            chunk = bytes([rng.randrange(256), rng.randrange(256)]) * rng.randint(1, 2000)
        elif kind == "byte":
            chunk = bytes([rng.randrange(1, 256)])
        else:
            chunk = rng.randbytes(rng.randint(1, 300))
        chunk = chunk[: size - at]
        disk[at : at + len(chunk)] = chunk
    return bytes(disk)


def _feed(d: dump.Dumper, disk: bytes, count: int, rng: random.Random) -> None:
    """Feed `disk[:count]` to `d` in random pieces (whole lines), zero pieces as zero runs."""
    pos = 0
    while pos < count:
        n = min(count - pos, 16 * rng.randint(1, 400))
        piece = disk[pos : pos + n]
        if not any(piece) and rng.random() < 0.7:
            d.zeroes(n)
        else:
            d.data(piece)
        pos += n


@pytest.mark.parametrize("colour", [False, True])
def test_bulk_formatting_matches_reference(colour: bool) -> None:
    rng = random.Random(1234 + colour)
    sizes = [0, 1, 7, 15, 16, 17, 31, 32, 33, 48, 100, 1000, 4096, 65543, 200000]
    for trial in range(150):
        size = rng.choice(sizes)
        disk = _random_disk(rng, size)
        limit = None if rng.random() < 0.5 else rng.randint(0, size + 40)
        count = size if limit is None else min(size, limit)
        buf = io.BytesIO()
        d = dump.Dumper(buf, size, colour)
        _feed(d, disk, count, rng)
        d.flush()
        assert buf.getvalue() == reference_dump(disk, limit, colour), (trial, size, limit)


@pytest.mark.parametrize("colour", [False, True])
@pytest.mark.parametrize("base", [4090 * 16, 2**40 - 100 * 16, 2**40, 2**44 + 4096 * 16])
def test_offsets_across_4096_lines_and_past_1_tib(base: int, colour: bool) -> None:
    """Offset digits come from tables in blocks of 4096 lines; past 1 TiB they are wider than
    the usual 10 digits ("%010x" is a minimum)."""
    rng = random.Random(base)
    data = b"".join(rng.choice([rng.randbytes(16), b"x" * 16]) for _ in range(5000)) + b"tail"
    buf = io.BytesIO()
    d = dump.Dumper(buf, base + len(data) + 32, colour)
    d.offset = base  # as after a zero run that ended with a different line
    d.data(data[:16 * 4100])
    d.data(data[16 * 4100 :])
    d.flush()
    out = buf.getvalue()
    assert out == reference_dump(data, colour=colour, base=base,
                                 disk_size=base + len(data) + 32)
    if base >= 2**40 and not colour:
        assert f"{base:x}:".encode() in out and len(f"{base:x}") > 10


def test_squashing_rules() -> None:
    """First and last lines are never squashed; a run is one '*'; equal non-zero lines too."""
    disk = bytes(16) * 4 + b"A" * 16 * 3 + bytes(16) * 3
    text = reference_dump(disk).decode()
    assert text == (
        "0000000000: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n"
        "*\n"
        "0000000040: 41 41 41 41 41 41 41 41  41 41 41 41 41 41 41 41 |AAAAAAAAAAAAAAAA|\n"
        "*\n"
        "0000000070: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n"
        "*\n"
        "0000000090: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n"
    )
    buf = io.BytesIO()
    d = dump.Dumper(buf, len(disk), False)
    d.data(disk)
    d.flush()
    assert buf.getvalue().decode() == text


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("20", 20),
        (" \t20", 20),
        ("+20", 20),
        ("1M", 1),  # sscanf stops at the first non-digit: no size suffixes
        ("0x10", 0),
        ("-0", 0),
        ("-1", 2**64 - 1),
        ("-5", 2**64 - 5),
        ("99999999999999999999999", 2**64 - 1),
        ("18446744073709551621", 2**64 - 1),
        ("", None),
        ("abc", None),
        ("-", None),
        ("- 5", None),
        ("+-1", None),
        ("٣", None),
    ],
)
def test_parse_length_is_sscanf(text: str, value: int | None) -> None:
    assert dump.parse_length(text) == value


# ----------------------------------------------------------------------------- against a server


@pytest.fixture(scope="module")
def memory_disk(tmp_path_factory: pytest.TempPathFactory):
    """A pynbd memory disk of 1000005 bytes (not a multiple of 16) with data, repeated lines,
    unaligned writes and zero runs longer than the zero-skipping threshold."""
    from helpers import short_tmpdir, start_server

    d = short_tmpdir()
    sock = d / "m.sock"
    srv = start_server([*PYNBD, "serve", "-f", "-U", sock, "memory", "1000005"],
                       logdir=d / "log", sock=sock)
    disk = bytearray(1000005)
    writes = [
        (0, b"\x01"),
        (0x100, b"hello, world!"),
        (0x1000, bytes(range(256)) * 8),
        (0x40001, b"\xff" * 40000),
        (0x90007, b"abc" * 5),
        (1000005 - 3, b"end"),
    ]
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    for off, data in writes:
        h.pwrite(data, off)
        disk[off : off + len(data)] = data
    h.shutdown()
    h.close()
    try:
        yield srv, bytes(disk)
    finally:
        srv.stop()
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    "args",
    [[], ["--no-color", "-n", "20"], ["--length=300017"], ["--colour", "--limit", "1000004"]],
    ids=["all", "nocolour-n20", "length", "colour-limit"],
)
def test_memory_disk(memory_disk, args: list[str]) -> None:
    srv, disk = memory_disk
    out = run_pynbd("dump", *args, srv.uri).stdout
    limit = None
    for i, a in enumerate(args):
        if a in ("-n", "--limit"):
            limit = int(args[i + 1])
        elif a.startswith("--length="):
            limit = int(a.split("=", 1)[1])
    colour = any(a in ("--color", "--colour") for a in args)
    assert out == reference_dump(disk, limit, colour)


def test_options_after_the_uri(memory_disk) -> None:
    """GNU getopt permutes: options may follow the URI, as with nbddump."""
    srv, disk = memory_disk
    assert run_pynbd("dump", srv.uri, "-n", "100").stdout == reference_dump(disk, 100)


def test_pattern_bracket_form() -> None:
    """``[ CMD ARGS ... ]`` starts the server with socket activation."""
    cp = run_pynbd("dump", "--", "[", *PYNBD, "serve", "pattern", "1001", "]")
    assert cp.stdout == reference_dump(pattern(1001))
    assert cp.stderr == b""


def test_empty_and_tiny_disks(pynbd_server) -> None:
    empty = pynbd_server("memory", "0")
    assert run_pynbd("dump", empty.uri).stdout == b""
    tiny = pynbd_server("pattern", "5")
    assert run_pynbd("dump", tiny.uri).stdout == (
        b"0000000000: 00 00 00 00 00                                   |.....           |\n"
    )
    assert run_pynbd("dump", "-n", "0", tiny.uri).stdout == b""


def test_huge_sparse_export_is_not_read(pynbd_server) -> None:
    """64 GiB of which a few bytes are data: zero extents are skipped, never read (reading
    them at any plausible speed would take minutes)."""
    srv = pynbd_server("memory", "64G")
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    h.pwrite(b"hello", 0x4_0000_0000)  # 16 GiB
    h.shutdown()
    h.close()
    t0 = time.monotonic()
    out = run_pynbd("dump", srv.uri, timeout=60).stdout.decode()
    took = time.monotonic() - t0
    assert out == (
        "0000000000: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n"
        "*\n"
        "0400000000: 68 65 6c 6c 6f 00 00 00  00 00 00 00 00 00 00 00 |hello...........|\n"
        "0400000010: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n"
        "*\n"
        "0ffffffff0: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n"
    )
    assert took < 30, f"a 64 GiB sparse dump took {took:.1f} s"


def test_reader_going_away_ends_like_sigpipe(pynbd_server) -> None:
    srv = pynbd_server("pattern", "16M")
    p = subprocess.Popen([*PYNBD, "dump", srv.uri], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=peer_env())
    assert p.stdout is not None and p.stderr is not None
    first = p.stdout.read(200)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=30) == -signal.SIGPIPE
    assert first.startswith(b"0000000000: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 08")
    assert b"Traceback" not in err


def test_interrupt_restores_the_terminal_colour(pynbd_server) -> None:
    """On SIGINT (as on SIGTERM, SIGHUP, SIGQUIT) nbddump ends the line, resets the colour
    and exits 1."""
    srv = pynbd_server("pattern", "256M")
    p = subprocess.Popen([*PYNBD, "dump", "--color", srv.uri], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=peer_env())
    assert p.stdout is not None
    got = p.stdout.read(4096)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert (got + out).endswith(b"\n\033[0m")
    assert b"Traceback" not in err


# ----------------------------------------------------------------------------- the command line


def test_version_help_and_completion_lists(capsys: pytest.CaptureFixture[str]) -> None:
    version = f"pynbd dump {__version__}\nlibnbd 1.14.2\n"
    assert run_pynbd("dump", "-V").stdout == version.encode()
    assert dump.main(["--version"]) == 0
    assert capsys.readouterr().out == version
    assert dump.main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "\n    pynbd dump NBD-URI | [ CMD ARGS ... ]\n" in usage
    assert "\n    pynbd dump -- [ qemu-nbd -r -f qcow2 file.qcow2 ]\n" in usage
    assert "    nbddump " not in usage and "follows libnbd's nbddump" in usage
    assert dump.main(["--short-options"]) == 0
    assert capsys.readouterr().out == "-n\n-V\n"
    assert dump.main(["--long-options"]) == 0
    longs = capsys.readouterr().out.split()
    assert longs[:4] == ["--help", "--version", "--color", "--colors"]
    assert longs[-2:] == ["--length", "--limit"]


BAD = [
    (["--foo", "nbd://x"], "pynbd dump: unrecognized option '--foo'"),
    (["--foo=3", "nbd://x"], "pynbd dump: unrecognized option '--foo=3'"),
    (["-x", "nbd://x"], "pynbd dump: invalid option -- 'x'"),
    (["-n"], "pynbd dump: option requires an argument -- 'n'"),
    (["--length"], "pynbd dump: option '--length' requires an argument"),
    (["--l=3", "nbd://x"], ("pynbd dump: option '--l=3' is ambiguous; possibilities:"
     " '--long-options' '--length' '--limit'")),
    (["--help=1"], "pynbd dump: option '--help' doesn't allow an argument"),
    (["--colour=yes", "nbd://x"], "pynbd dump: option '--colour' doesn't allow an argument"),
    (["-n", "abc", "nbd://x"], "pynbd dump: could not parse --length option: abc"),
    (["--length=", "nbd://x"], "pynbd dump: could not parse --length option: "),
    ([], "pynbd dump: no NBD-URI or [ CMD ARGS ... ] given (see pynbd dump --help)"),
    (["nbd://a", "nbd://b"], ("pynbd dump: expected one NBD-URI or [ CMD ARGS ... ], got 2"
     " arguments (see pynbd dump --help)")),
    (["[", "]"], ("pynbd dump: expected [ CMD ARGS ... ]: a command between separate '[' and ']'"
     " arguments (see pynbd dump --help)")),
    (["--", "nbd://a", "--"], ("pynbd dump: expected one NBD-URI or [ CMD ARGS ... ], got 2"
     " arguments (see pynbd dump --help)")),
    (["notauri"], ("pynbd dump: nbd_connect_uri: NBD URI does not have a scheme: valid NBD URIs"
     " should start with a scheme like nbd://, nbds:// or nbd+unix://: Invalid argument")),
    (["nbd+unix:///?socket=/nonexistent/sock"],
     "pynbd dump: nbd_connect_uri: connect: No such file or directory"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) or "none" for a, _ in BAD])
def test_bad_command_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert dump.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == message + "\n"


def test_bad_command_line_through_the_cli() -> None:
    """The same through ``pynbd dump`` in a process: one line, status 1, no traceback."""
    cp = run_pynbd("dump", "--no-such-option", "nbd://x", check=False)
    assert cp.returncode == 1
    assert cp.stdout == b""
    assert cp.stderr == b"pynbd dump: unrecognized option '--no-such-option'\n"
    cp = run_pynbd("dump", "--", "[", sys.executable, "-c", "pass", "]", check=False)
    assert cp.returncode == 1
    lines = cp.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "pynbd dump: nbd_connect_systemd_socket_activation: ")
