"""``pynbd info`` against ``pynbd serve``: nbdinfo 1.14's output formats, exit codes and errors.

Most runs call ``pynbd.tools.info.main`` in this process (a real server process, real
sockets; starting a Python interpreter per run would cost ~0.3 s each); a few run the
``pynbd info`` command itself. The byte-for-byte comparison with the real nbdinfo is in
tests/interop/test_tool_info.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_pynbd
from info_helpers import pynbd_info, write

from pynbd.tools import info as info_mod
from pynbd.tools._getopt import GetoptError, getopt_long

FILE = shutil.which("file")


def info(*args: str) -> tuple[int, str, str]:
    """Run ``pynbd info ARGS`` in this process: (exit status, stdout, stderr)."""
    r = pynbd_info(*args)
    return r.rc, r.out, r.err


@pytest.fixture(scope="module")
def mem(tmp_path_factory: pytest.TempPathFactory):
    """One writable 1M memory server for the read-only tests of this module, with "hello
    world" in the first 64K and 64K of data at 128K."""
    from helpers import PYNBD, short_tmpdir, start_server

    d = short_tmpdir()
    sock = d / "m.sock"
    srv = start_server([*PYNBD, "serve", "-f", "-U", sock, "memory", "1M"], logdir=d / "log",
                       sock=sock)
    write(srv.uri, (b"hello world\n" * 5462)[:65536], 0)
    write(srv.uri, b"\x01" * 65536, 131072)
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- the default output


def test_text_output(mem) -> None:
    rc, out, err = info(mem.uri)
    assert (rc, err) == (0, "")
    content = "\tcontent: ASCII text\n" if FILE else ""
    assert out == (
        "protocol: newstyle-fixed without TLS, using structured packets\n"
        'export="":\n'
        "\texport-size: 1048576 (1M)\n"
        f"{content}"
        f"\turi: {mem.uri}\n"
        "\tcontexts:\n"
        "\t\tbase:allocation\n"
        "\tis_rotational: false\n"
        "\tis_read_only: false\n"
        "\tcan_cache: true\n"
        "\tcan_df: true\n"
        "\tcan_fast_zero: true\n"
        "\tcan_flush: true\n"
        "\tcan_fua: true\n"
        "\tcan_multi_conn: true\n"
        "\tcan_trim: true\n"
        "\tcan_zero: true\n"
        "\tblock_size_minimum: 1\n"
        "\tblock_size_preferred: 4096\n"
        "\tblock_size_maximum: 33554432\n"
    )


def test_json_output(mem) -> None:
    rc, out, _ = info("--json", mem.uri)
    assert rc == 0
    doc = json.loads(out)
    assert list(doc) == ["protocol", "TLS", "structured", "exports"]
    assert (doc["protocol"], doc["TLS"], doc["structured"]) == ("newstyle-fixed", False, True)
    (e,) = doc["exports"]
    keys = ["export-name", "content", "uri", "contexts", "is_rotational", "is_read_only",
            "can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua", "can_multi_conn",
            "can_trim", "can_zero", "block_size_minimum", "block_size_preferred",
            "block_size_maximum", "export-size", "export-size-str"]
    if not FILE:
        keys.remove("content")
    assert list(e) == keys
    assert e["export-size"] == 1048576 and e["export-size-str"] == "1M"
    assert e["contexts"] == ["base:allocation"] and e["uri"] == mem.uri
    assert all(isinstance(e[k], bool) for k in keys if k.startswith(("is_", "can_")))
    # nbdinfo's layout: one key per line, exports indented by one TAB.
    assert out.startswith('{\n"protocol": "newstyle-fixed",\n"TLS": false,\n')
    assert '\t"export-name": "",\n' in out and out.endswith('\t"export-size-str": "1M"\n\t} ]\n}\n')


def test_colour(mem) -> None:
    _, out, _ = info("--colour", "--no-content", mem.uri)
    assert out.startswith("\033[22;90mprotocol: newstyle-fixed")
    assert "\033[22;32m\tcan_cache: true\n\033[0m" in out
    _, plain, _ = info("--no-colours", "--no-content", mem.uri)
    assert "\033" not in plain


def test_no_content_and_file_missing(mem, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, out, _ = info("--no-content", mem.uri)
    assert "content:" not in out
    # Without file(1) on PATH the shell says so on stderr and there is no content line.
    (tmp_path / "sh").symlink_to("/bin/sh")
    monkeypatch.setenv("PATH", str(tmp_path))
    cp = subprocess.run([sys.executable, "-m", "pynbd", "info", mem.uri], check=False,
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0
    assert "content:" not in cp.stdout and "\turi: " in cp.stdout
    assert "file: not found" in cp.stderr


@pytest.mark.skipif(FILE is None, reason="file(1) not installed")
def test_content_is_file_output(pynbd_server) -> None:
    srv = pynbd_server("memory", "64K")
    write(srv.uri, b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\x3e\x00", 0)
    _, out, _ = info(srv.uri)
    assert "\tcontent: ELF 64-bit LSB executable, x86-64" in out


def test_human_sizes_and_zero_size(pynbd_server) -> None:
    assert info_mod.human_size(0) == ("0", False)
    assert info_mod.human_size(1000) == ("1000", False)
    assert info_mod.human_size(3 << 30) == ("3G", True)
    assert info_mod.human_size(1536) == ("1536", False)
    assert info_mod.human_size(2560 * 1024) == ("2560K", True)
    srv = pynbd_server("null", "0")
    rc, out, _ = info(srv.uri)
    assert rc == 0 and "\texport-size: 0\n" in out
    _, out, _ = info("--map", "--totals", "--json", srv.uri)
    assert out == "[]\n"
    _, out, _ = info("--map", srv.uri)
    assert out == ""


def test_json_string_escapes() -> None:
    assert info_mod.json_string('a"b\\c\n\x01é') == '"a\\"b\\\\c\\u000a\\u0001é"'


def test_read_only_simple_replies(pynbd_server) -> None:
    srv = pynbd_server("--no-sr", "-r", "memory", "3M")
    rc, out, _ = info("--no-content", srv.uri)
    assert rc == 0
    assert out.startswith("protocol: newstyle-fixed without TLS, using simple packets\n")
    assert "\tcontexts:" not in out  # no structured replies: no meta contexts to list
    assert "\tis_read_only: true\n\tcan_cache: true\n\tcan_df: false\n" in out


def test_oldstyle(pynbd_server) -> None:
    srv = pynbd_server("-o", "memory", "1M")
    rc, out, _ = info("--no-content", "--json", srv.uri)
    assert rc == 0
    doc = json.loads(out)
    assert doc["protocol"] == "oldstyle" and doc["structured"] is False
    assert "contexts" not in doc["exports"][0]


# --------------------------------------------------------------------------- --size, --is, --can


def test_size(mem) -> None:
    assert info("--size", mem.uri) == (0, "1048576\n", "")
    assert info("--size", "--json", mem.uri) == (0, "1048576\n", "")


CAN_RW = {
    "connect": 0, "read": 0, "write": 0, "read-only": 2, "readonly": 2, "READ_ONLY": 2,
    "rotational": 2, "tls": 2, "sr": 0, "structured-reply": 0, "Structured Replies": 0,
    "cache": 0, "df": 0, "fast-zero": 0, "fastzero": 0, "flush": 0, "fua": 0,
    "multi-conn": 0, "multi_conn": 0, "trim": 0, "zero": 0,
}


@pytest.mark.parametrize(("name", "status"), sorted(CAN_RW.items()))
def test_can_writable(mem, name: str, status: int) -> None:
    assert info("--can", name, mem.uri) == (status, "", "")


def test_is_and_can_read_only(pynbd_server) -> None:
    srv = pynbd_server("-r", "--no-sr", "memory", "1M")
    results = {n: info("--is" if n.startswith("read") else "--can", n, srv.uri)[0]
               for n in ("read-only", "read", "write", "trim", "zero", "fua", "sr", "df")}
    assert results == {"read-only": 0, "read": 0, "write": 2, "trim": 2, "zero": 2,
                       "fua": 2, "sr": 2, "df": 2}


def test_can_unknown_name(mem) -> None:
    assert info("--can", "teleport", mem.uri) == (
        1, "", "pynbd info: unknown --can or --is option: teleport\n")
    # An empty name is still a --can (as nbdinfo's non-NULL empty string).
    assert info("--can=", mem.uri) == (1, "", "pynbd info: unknown --can or --is option: \n")


# --------------------------------------------------------------------------- --map


def test_map_text_json_totals(mem) -> None:
    rc, out, _ = info("--map", mem.uri)
    assert rc == 0
    assert out == (
        "         0       65536    0  data\n"
        "     65536       65536    3  hole,zero\n"
        "    131072       65536    0  data\n"
        "    196608      851968    3  hole,zero\n"
    )
    _, out, _ = info("--map", "--json", mem.uri)
    assert json.loads(out) == [
        {"offset": 0, "length": 65536, "type": 0, "description": "data"},
        {"offset": 65536, "length": 65536, "type": 3, "description": "hole,zero"},
        {"offset": 131072, "length": 65536, "type": 0, "description": "data"},
        {"offset": 196608, "length": 851968, "type": 3, "description": "hole,zero"},
    ]
    _, out, _ = info("--map=base:allocation", "--totals", mem.uri)
    assert out == "    131072  12.5%   0 data\n    917504  87.5%   3 hole,zero\n"
    _, out, _ = info("--map", "--total", "--json", mem.uri)
    assert out == ('[\n{ "size": 131072, "percent": 12.5, "type": 0, "description": "data" },\n'
                   '{ "size": 917504, "percent": 87.5, "type": 3, "description": "hole,zero" }'
                   "\n]\n")


def test_map_unknown_context(mem) -> None:
    assert info("--map=qemu:dirty-bitmap:x", mem.uri) == (
        1, "", ('pynbd info: --map: server does not support metadata context '
               '"qemu:dirty-bitmap:x"\n'))


# --------------------------------------------------------------------------- --list


@pytest.fixture
def exports_dir(tmp_path: Path) -> Path:
    d = tmp_path / "exports"
    d.mkdir()
    (d / "disk.img").write_bytes(bytes(2 << 20))
    (d / "notes.txt").write_text("hello\n")
    (d / 'we"ird\tname').write_bytes(bytes(1000))
    return d


def test_list(pynbd_server, exports_dir: Path) -> None:
    srv = pynbd_server("file", f"dir={exports_dir}")
    rc, out, err = info("--list", srv.uri)
    assert (rc, err) == (0, "")
    assert out.startswith("protocol: newstyle-fixed without TLS, using structured packets\n")
    blocks = out.split("export=")[1:]
    names = sorted(b.split(":\n", 1)[0] for b in blocks)
    assert names == ['"disk.img"', '"notes.txt"', '"we\\"ird\\u0009name"']
    assert "content:" not in out  # --list probes no content unless asked
    disk = next(b for b in blocks if b.startswith('"disk.img"'))
    assert "\texport-size: 2097152 (2M)\n" in disk
    assert f"\turi: nbd+unix:///disk.img?socket={srv.sock}\n" in disk

    rc, out, _ = info("-L", "--json", "--content", srv.uri)
    doc = json.loads(out)
    by_name = {e["export-name"]: e for e in doc["exports"]}
    assert set(by_name) == {"disk.img", "notes.txt", 'we"ird\tname'}
    assert by_name["notes.txt"]["export-size"] == 6
    if FILE:
        assert by_name["notes.txt"]["content"] == "ASCII text"
        assert by_name["disk.img"]["content"] == "data"


def test_list_empty(pynbd_server, tmp_path: Path) -> None:
    srv = pynbd_server("file", f"dir={tmp_path}")
    assert info("-L", "--json", srv.uri) == (
        0, ('{\n"protocol": "newstyle-fixed",\n"TLS": false,\n"structured": true,\n'
           '"exports": []\n}\n'), "")


def test_missing_export(pynbd_server, exports_dir: Path) -> None:
    srv = pynbd_server("file", f"dir={exports_dir}")
    rc, out, err = info(srv.uri)
    # As nbdinfo: the protocol line was gathered, so it is printed; the export failed.
    assert rc == 1
    assert out == "protocol: newstyle-fixed without TLS, using structured packets\n"
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("pynbd info: nbd_opt_go: server replied with error")
    assert lines[0].endswith(" for the default export")
    assert lines[1] == "pynbd info: suggestion: to list all exports on the server, use --list"
    rc, out, err = info("--size", srv.uri.replace(":///", ":///nope"))
    assert (rc, out) == (1, "")
    assert err.startswith("pynbd info: nbd_connect_uri: ") and "nope" in err


# --------------------------------------------------------------------------- [ CMD ]


def test_subprocess_server() -> None:
    pynbd = [sys.executable, "-m", "pynbd", "serve"]
    rc, out, _ = info("--no-content", "--", "[", *pynbd, "memory", "2M", "]")
    assert rc == 0
    assert 'export="":\n\texport-size: 2097152 (2M)\n\tcontexts:\n' in out
    assert "uri:" not in out  # nothing to reconnect to once the subprocess has gone
    assert info("--size", "--", "[", *pynbd, "-r", "null", "5000", "]") == (0, "5000\n", "")
    # Without "--" the server's options are this command's, as with nbdinfo.
    rc, _, err = info("--size", "[", *pynbd, "-r", "null", "5000", "]")
    assert rc == 1 and err.startswith("pynbd info: invalid option -- 'm'")
    assert info("--can", "write", "--", "[", *pynbd, "-r", "null", "1", "]")[0] == 2


def test_subprocess_that_fails() -> None:
    rc, out, err = info("--size", "--", "[", sys.executable, "-c", "pass", "]")
    assert (rc, out) == (1, "")
    assert err.startswith("pynbd info: nbd_connect_systemd_socket_activation: ")
    assert err.count("\n") == 1


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus", "nbd://x"], "unrecognized option '--bogus'"),
    (["-x", "nbd://x"], "invalid option -- 'x'"),
    (["-LZ", "nbd://x"], "invalid option -- 'Z'"),
    (["--can"], "option '--can' requires an argument"),
    (["--json=yes", "nbd://x"], "option '--json' doesn't allow an argument"),
    (["--co", "nbd://x"], "option '--co' is ambiguous; possibilities: '--color' '--content'"),
    (["--map", "--to=1", "nbd://x"], "option '--total' doesn't allow an argument"),
    ([], "missing NBD-URI or [ CMD ARGS ... ]"),
    (["nbd://a", "nbd://b"], "expected one NBD-URI or [ CMD ARGS ... ], got 2 arguments"),
    (["[", "]"], "expected one NBD-URI or [ CMD ARGS ... ], got 2 arguments"),
])
def test_usage_errors(args: list[str], message: str) -> None:
    rc, out, err = info(*args)
    assert (rc, out) == (1, "")
    assert err.startswith(f"pynbd info: {message}") and err.count("\n") == 1
    assert "Try 'pynbd info --help'." in err


@pytest.mark.parametrize(("args", "message"), [
    (["--list", "--size", "nbd://x"], "you cannot use --list, --map and --size together."),
    (["--map", "--can", "zero", "nbd://x"], "you cannot use --list, --map and --size together."),
    (["--content", "--no-content", "nbd://x"], ("you cannot use --content and --no-content "
                                                "together.")),
    (["--totals", "nbd://x"], "you must use --totals only with --map option."),
    (["notauri"], ("nbd_connect_uri: NBD URI does not have a scheme: valid NBD URIs should start "
                  "with a scheme like nbd://, nbds:// or nbd+unix://: Invalid argument")),
    (["nbd+unix:///?socket=/nonexistent/sock"], ("nbd_connect_uri: connect: No such file or "
                                                "directory")),
])
def test_errors(args: list[str], message: str) -> None:
    assert info(*args) == (1, "", f"pynbd info: {message}\n")


def test_unreachable_server() -> None:
    from helpers import free_tcp_port

    port = free_tcp_port()
    rc, out, err = info("--can", "connect", f"nbd://127.0.0.1:{port}/")
    assert (rc, out) == (1, "")
    assert err == (f"pynbd info: nbd_connect_uri: connect: 127.0.0.1:{port}: could not connect "
                   "to remote host: Connection refused\n")


def test_help_version_option_lists() -> None:
    rc, out, _ = info("--help")
    assert rc == 0 and "pynbd info --map [--totals] [--json] NBD-URI" in out
    rc, out, _ = info("-V")
    assert rc == 0 and out.splitlines()[0].startswith("pynbd info ")
    assert out.splitlines()[1] == "libnbd 1.14.2"
    _, out, _ = info("--long-options")
    assert out.split() == ["--help", "--can", "--color", "--colors", "--colour", "--colours",
                           "--no-color", "--no-colors", "--no-colour", "--no-colours",
                           "--content", "--no-content", "--is", "--json", "--list", "--map",
                           "--size", "--total", "--totals", "--version"]
    assert info("--short-options")[1] == "-L\n-V\n"


def test_options_after_uri_and_abbreviations(mem) -> None:
    # GNU getopt: options may follow the URI; unique prefixes are accepted.
    assert info(mem.uri, "--siz") == (0, "1048576\n", "")
    rc, out, _ = info("--js", "--no-cont", mem.uri)
    assert rc == 0 and json.loads(out)["exports"][0]["export-size"] == 1048576


def test_getopt_posix_and_bundling(monkeypatch: pytest.MonkeyPatch) -> None:
    from pynbd.tools._getopt import LongOption

    longs = [LongOption("map", 2, "map"), LongOption("can", 1, "can")]
    assert getopt_long(["-LV", "u", "--map", "--can=x", "--", "-L"], "LV", longs) == (
        [("L", None), ("V", None), ("map", None), ("can", "x")], ["u", "-L"])
    assert getopt_long(["--map=", "--can", "y"], "LV", longs)[0] == [("map", ""), ("can", "y")]
    monkeypatch.setenv("POSIXLY_CORRECT", "1")
    assert getopt_long(["u", "-L"], "LV", longs) == ([], ["u", "-L"])
    with pytest.raises(GetoptError, match="unrecognized option '--mapx'"):
        getopt_long(["--mapx"], "LV", longs)


def test_command_line_tool(mem) -> None:
    """The real command: `pynbd info` (dispatch, exit codes through the process)."""
    cp = run_pynbd("info", "--json", "--no-content", mem.uri)
    assert json.loads(cp.stdout)["exports"][0]["uri"] == mem.uri
    cp = run_pynbd("info", "--is", "read-only", mem.uri, check=False)
    assert (cp.returncode, cp.stdout, cp.stderr) == (2, b"", b"")
    cp = run_pynbd("info", "--bogus", check=False)
    assert cp.returncode == 1 and cp.stdout == b""
    assert cp.stderr.decode() == ("pynbd info: unrecognized option '--bogus'. "
                                  "Try 'pynbd info --help'.\n")
