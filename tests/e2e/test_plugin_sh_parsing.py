"""How the sh and eval plugins read what scripts print (pynbd.plugins._shell), byte by byte:
nbdkit 1.32's rules (nbdkit_parse_size, handle_script_error, the list and extents formats).

The same rules are checked against nbdkit itself in tests/interop/test_plugin_sh.py; these
pin each one down without a server.
"""

from __future__ import annotations

import errno
import os

import pytest

from pynbd.plugin import EXTENT_HOLE, EXTENT_ZERO, Flag
from pynbd.plugins._shell import (
    ERRNO_NAMES,
    ScriptError,
    flags_string,
    parse_default_export,
    parse_exports,
    parse_extents,
    parse_size,
    parse_stderr,
    run,
    shell_quote,
)

S = "/x/script"


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("512", 512), ("08", 8), ("  1K", 1024), ("\t+2k", 2048), ("1M", 1 << 20),
    ("1m", 1 << 20), ("2s", 1024), ("3b", 3), ("1G", 1 << 30), ("1T", 1 << 40),
    ("1P", 1 << 50), ("1E", 1 << 60), ("7E", 7 << 60), ("-0", 0),
    ("9223372036854775807", (1 << 63) - 1), (b"4K\0garbage", 4096),
])
def test_parse_size(text, value) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text,message", [
    ("", "could not parse size string ()"),
    ("abc", "could not parse size string (abc)"),
    ("-1", "size cannot be negative (-1)"),
    ("9223372036854775808", "size (9223372036854775808) exceeds maximum value"),
    ("1x", "could not parse size: unknown suffix 'x'"),
    ("1MB", "could not parse size: unknown suffix 'MB'"),
    ("1.5M", "could not parse size: unknown suffix '.5M'"),
    ("1M\n", "could not parse size: unknown suffix 'M\n'"),
    ("1 ", "could not parse size: unknown suffix ' '"),
    ("0x10", "could not parse size: unknown suffix 'x10'"),
    ("8E", "overflow computing size (8E)"),
    ("99999999999E", "overflow computing size (99999999999E)"),
])
def test_parse_size_refuses_with_nbdkits_message(text, message) -> None:
    with pytest.raises(ValueError) as e:
        parse_size(text)
    assert str(e.value) == message


@pytest.mark.parametrize("stderr,err,message,detail", [
    (b"ENOSPC custom message\n", errno.ENOSPC, "custom message", None),
    (b"eperm", errno.EPERM, "", None),
    (b"EnoMem  \t spaced", errno.ENOMEM, "spaced", None),
    (b"EINVAL\tx\n\n\n", errno.EINVAL, "x", None),
    (b"EPIPE", errno.EIO, "EPIPE", None),
    (b"EINVALID foo", errno.EIO, "EINVALID foo", None),
    (b"ENOTSUPP x", errno.EIO, "ENOTSUPP x", None),
    (b"ESHUTDOWN line1\nline2\n", errno.ESHUTDOWN, "line1",
     f"{S}: ESHUTDOWN line1\nline2"),
    (b"plain text\nmore", errno.EIO, "plain text", f"{S}: plain text\nmore"),
    (b"EIO\r\n", errno.EIO, "", None),   # \r is whitespace after a name ...
    (b"x\r\n", errno.EIO, "x\r", None),  # ... but only newlines are stripped at the end
    (b"EROFS a\0b", errno.EROFS, "a", None),
])
def test_parse_stderr(stderr, err, message, detail) -> None:
    e = parse_stderr(S, stderr)
    assert (e.errno, e.message, e.detail) == (err, f"{S}: {message}", detail)


@pytest.mark.parametrize("stderr", [b"", b"\n", b"\n\n", b"\0ignored"])
def test_parse_stderr_empty(stderr) -> None:
    e = parse_stderr(S, stderr)
    assert e.errno == errno.EIO
    assert e.message == (f"{S}: script exited with error, but did not print an error "
                         "message on stderr")


@pytest.mark.parametrize("name", sorted(ERRNO_NAMES))
def test_every_errno_name_in_either_case(name) -> None:
    for text in (name, name.lower(), name.title()):
        assert parse_stderr(S, f"{text} why".encode()).errno == ERRNO_NAMES[name]


def test_errno_names_are_nbdkit_132s() -> None:
    assert sorted(ERRNO_NAMES) == sorted(
        ["EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ESHUTDOWN", "ENOTSUP", "EOPNOTSUPP", "EROFS", "EDQUOT", "EFBIG"])


@pytest.mark.parametrize("flags,text", [
    (0, ""), (Flag.FUA, "fua"), (Flag.MAY_TRIM, "may_trim"), (Flag.REQ_ONE, "req_one"),
    (Flag.FAST_ZERO, "fast"), (Flag.FUA | Flag.MAY_TRIM | Flag.FAST_ZERO, "fua,may_trim,fast"),
    (Flag.FAST_ZERO | Flag.FUA, "fua,fast"), (15, "fua,may_trim,req_one,fast"),
])
def test_flags_string(flags, text) -> None:
    assert flags_string(flags) == text


@pytest.mark.parametrize("arg,shown", [
    ("pread", "pread"), ("/tmp/a-b_c.d=e,f:g", "/tmp/a-b_c.d=e,f:g"), ("", ""),
    ("my export", '"my export"'), ('a"b', '"a\\"b"'), ("$x`y`\\", '"\\$x\\`y\\`\\\\"'),
    ("tab\there", '"tab\there"'), (b"caf\xc3\xa9", '"caf\u00e9"'),
])
def test_shell_quote(arg, shown) -> None:
    assert shell_quote(arg) == shown


@pytest.mark.parametrize("out,exports", [
    (b"NAMES\na\nb\n", [("a", ""), ("b", "")]),
    (b"NAMES\na\nb", [("a", "")]),                      # an unterminated line is dropped
    (b"INTERLEAVED\na\nda\nb\n", [("a", "da"), ("b", "")]),
    (b"INTERLEAVED\na\nda", [("a", "")]),
    (b"NAMES+DESCRIPTIONS\na\nb\nc\nda\ndb\n", [("a", "da"), ("b", "db"), ("c", "")]),
    (b"NAMES+DESCRIPTIONS\na\nb\nda\ndb", [("a", "da"), ("b", "")]),
    (b"NAMES+DESCRIPTIONS\na\nb\nda", [("a", "b")]),
    (b"foo\nbar\n", [("foo", ""), ("bar", "")]),        # no mode line: NAMES
    (b"names\na\n", [("names", ""), ("a", "")]),        # modes are upper case
    (b"NAMES\r\na\n", [("NAMES\r", ""), ("a", "")]),
    (b"\na\n", [("", ""), ("a", "")]),
    (b"foo", []), (b"", []), (b"NAMES", []), (b"NAMES\n", []),
    (b"NAMES\na\n\0b\nc\n", [("a", "")]),                # C strings end at a NUL
])
def test_parse_exports(out, exports) -> None:
    assert parse_exports(out) == exports


@pytest.mark.parametrize("out,name", [
    (b"foo\n", "foo"), (b"foo", "foo"), (b"foo\nbar", "foo"), (b"NAMES\nx\n", "x"),
    (b"NAMES\nx", "x"), (b"INTERLEAVED\n", ""), (b"NAMES+DESCRIPTIONS\na\nb\n", "a"),
    (b"", ""), (b"\nx\n", ""), (b"INTERLEAVED", "INTERLEAVED"),
])
def test_parse_default_export(out, name) -> None:
    assert parse_default_export(out) == name


@pytest.mark.parametrize("out,extents", [
    (b"0 1M\n", [(0, 1 << 20, 0)]),
    (b"0 64K\n64K 64K hole\n128K 128K hole,zero\n256K 768K 3", [
        (0, 65536, 0), (65536, 65536, EXTENT_HOLE), (131072, 131072, EXTENT_HOLE | EXTENT_ZERO),
        (262144, 786432, 3)]),
    (b"0\t1M\tzero\n", [(0, 1 << 20, EXTENT_ZERO)]),
    (b"  0   1M  \n", [(0, 1 << 20, 0)]),
    (b"0 1M 3abc\n", [(0, 1 << 20, 3)]),
    (b"0 1M -1\n", [(0, 1 << 20, 0xFFFFFFFF)]),
    (b"0 1M zerohole\n", [(0, 1 << 20, EXTENT_HOLE | EXTENT_ZERO)]),
    (b"0 1M HOLE\n", [(0, 1 << 20, 0)]),
    (b"0 2s extra words\n", [(0, 1024, 0)]),
    (b"", []),
])
def test_parse_extents(out, extents) -> None:
    assert parse_extents(S, out) == extents


@pytest.mark.parametrize("out,message", [
    (b"0\n", f"{S}: extents: cannot parse 0"),
    (b"  0\n", f"{S}: extents: cannot parse   0"),
    (b"\n0 1M\n", f"{S}: extents: cannot parse "),
    (b"0 1M\n\n", f"{S}: extents: cannot parse "),
    (b"0 abc\n", "could not parse size string (abc)"),
    (b"x 1M\n", "could not parse size string (x)"),
])
def test_parse_extents_refuses(out, message) -> None:
    with pytest.raises(ScriptError) as e:
        parse_extents(S, out)
    assert (e.value.errno, e.value.message) == (errno.EIO, message)


# ---- running a script ------------------------------------------------------------------------


def test_run_gives_status_output_and_errors(tmp_path) -> None:
    p = tmp_path / "s"
    p.write_text('#!/bin/sh\nwc -c; echo "err $1 $tmpdir" >&2; exit 7\n')
    p.chmod(0o755)
    assert run([str(p), "m"], b"x" * 100000, {"tmpdir": "/t"}) == (7, b"100000\n",
                                                                    b"err m /t\n")
    assert run([str(p), "m"], None, {})[:2] == (7, b"0\n")


def test_run_reports_what_perror_would(tmp_path) -> None:
    p = tmp_path / "s"
    p.write_text("#!/bin/sh\nexit 0\n")
    p.chmod(0o644)
    assert run([str(p)], None, {}) == (1, b"", f"{p}: Permission denied\n".encode())
    missing = str(tmp_path / "gone")
    assert run([missing], None, {}) == (1, b"", f"{missing}: No such file or directory\n"
                                                .encode())


def test_run_a_death_by_signal(tmp_path) -> None:
    p = tmp_path / "s"
    p.write_text("#!/bin/sh\necho dying >&2\nkill -TERM $$\n")
    p.chmod(0o755)
    assert run([str(p)], None, {}) == (-15, b"", b"dying\n")


def test_run_a_file_without_shebang_under_bin_sh(tmp_path) -> None:
    p = tmp_path / "s"
    p.write_text('echo "sh: $0 $1"\n')
    p.chmod(0o755)
    for _ in range(2):  # the second time straight to /bin/sh (remembered), same answer
        assert run([str(p), "m"], None, {}) == (0, f"sh: {p} m\n".encode(), b"")
    # Replaced by an executable of another kind: run as what it now is.
    new = tmp_path / "new"
    new.write_text("#!/usr/bin/perl\nprint \"perl: $ARGV[0]\\n\";\n")
    new.chmod(0o755)
    os.replace(new, p)
    assert run([str(p), "m"], None, {}) == (0, b"perl: m\n", b"")
