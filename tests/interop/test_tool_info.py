"""``pynbd info`` beside Debian's nbdinfo 1.14 on the same servers: the same bytes out.

Every comparison runs both programs with the same arguments against the same server (nbdkit,
qemu-nbd, ``pynbd serve``, or a server each starts itself with ``[ CMD ]``) and compares exit
status, stdout byte for byte and stderr (with nbdinfo's ``nbdinfo:`` prefix read as
``pynbd info:``). JSON is also parsed and compared key by key, so a mismatch names the field.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import IN_CI, PYNBD, free_tcp_port, missing, require, run_peer
from info_helpers import Result, nbdinfo, pynbd_info, write

#: Without file(1), nbdinfo 1.14.2 prints an uninitialised buffer as the content (see
#: docs/info.md): then the comparisons run with content probing off.
FILE = shutil.which("file")


def _args(args: tuple[str, ...]) -> tuple[str, ...]:
    if FILE is not None:
        return args
    if IN_CI:  # CI installs file(1): without it the content comparisons would not run
        missing("file not found on PATH (Debian package file)")
    if any(a in ("--map", "--size", "--can", "--is", "--long-options", "--short-options")
           or a.startswith("--map=") for a in args):
        return args
    return ("--no-content", *(a for a in args if a != "--content"))


def _expect(what: str, args: tuple[str, ...], want: Result, rc: int | tuple[int, ...]) -> None:
    """nbdinfo's exit status is the expected one: two identical failures are no match."""
    ok = rc if isinstance(rc, tuple) else (rc,)
    assert want.rc in ok, f"nbdinfo{what} {args} exited {want.rc}, expected {rc}: {want}"


def same(*args: str, raw: bool = False, rc: int | tuple[int, ...] = 0) -> Result:
    """Run both; assert identical results, and nbdinfo's exit status is `rc` (0: success;
    a tuple: any of them); return pynbd info's."""
    if not raw:
        args = _args(args)
    want = nbdinfo(*args)
    _expect("", args, want, rc)
    got = pynbd_info(*args)
    assert got.rc == want.rc, f"exit status for {args}: {got} != {want}"
    assert got.out == want.out, f"stdout for {args}"
    assert got.err == want.err, f"stderr for {args}"
    return got


def same_json(*args: str, rc: int = 0) -> object:
    """Both print JSON; compare parsed, key by key (the order too), then the text; nbdinfo
    exits with `rc`."""
    args = _args(args)
    want = nbdinfo("--json", *args)
    _expect(" --json", args, want, rc)
    got = pynbd_info("--json", *args)
    assert (got.rc, got.err) == (want.rc, want.err)
    if not want.out:  # an error before any output
        assert got.out == ""
        return None
    a, b = json.loads(want.out), json.loads(got.out)
    if isinstance(a, dict):
        assert list(b) == list(a)
        for key in a:
            if key == "exports":
                assert len(b[key]) == len(a[key])
                for ea, eb in zip(a[key], b[key], strict=True):
                    assert list(eb) == list(ea)
                    for k in ea:
                        assert (k, eb[k], type(eb[k])) == (k, ea[k], type(ea[k]))
            else:
                assert (key, b[key], type(b[key])) == (key, a[key], type(a[key]))
    else:
        assert b == a
    assert got.out == want.out
    return b


def fill(uri: str) -> None:
    """Text at 0, data at 128K and 512K: a map with holes between."""
    write(uri, (b"The quick brown fox\n" * 3277)[:65536], 0)
    write(uri, b"\xaa" * 65536, 131072)
    write(uri, b"\x55" * 196608, 524288)


MODES = [(), ("--no-content",), ("--colour",), ("--size",), ("--map",), ("--map", "--totals"),
         ("-L",), ("-L", "--content")]
JSON_MODES = [(), ("--size",), ("--map",), ("--map", "--totals"), ("-L",)]


# --------------------------------------------------------------------------- one export


@pytest.mark.parametrize("server", ["nbdkit", "pynbd"])
def test_memory_server(server: str, nbdkit_server, pynbd_server) -> None:
    factory = nbdkit_server if server == "nbdkit" else pynbd_server
    srv = factory("memory", "1M")
    fill(srv.uri)
    for mode in MODES:
        same(*mode, srv.uri)
    for mode in JSON_MODES:
        same_json(*mode, srv.uri)


def test_read_only_servers(nbdkit_server, pynbd_server) -> None:
    # (server, exit status of --map: 1 without structured replies, so no base:allocation;
    # the oldstyle protocol has none)
    for srv, map_rc in ((nbdkit_server("-r", "null", "1000"), 0),
                        (pynbd_server("-r", "--no-sr", "pattern", "3M"), 1),
                        (pynbd_server("-o", "memory", "7K"), 1)):
        same("--colour", srv.uri)
        same_json(srv.uri)
        same("--map", "--totals", srv.uri, rc=map_rc)


def test_plain_newstyle_server(pynbd_server) -> None:
    srv = pynbd_server("--mask-handshake=0", "pattern", "5000")
    same(srv.uri)
    same_json(srv.uri)
    same("--map", srv.uri, rc=1)  # no structured replies, so no base:allocation
    same("-L", srv.uri, rc=1)  # libnbd: "server is not using fixed newstyle protocol"


CAN_NAMES = ["connect", "read", "write", "read-only", "readonly", "read_only", "Read-Only",
             "rotational", "tls", "sr", "structured", "structured-reply", "structured_replies",
             "STRUCTURED REPLIES", "cache", "df", "fast-zero", "fastzero", "fast_zero", "flush",
             "fua", "multi-conn", "multiconn", "trim", "zero", "teleport", "has"]


#: Not a --can/--is name: an error (exit 1) after connecting.
NOT_NAMES = {"teleport", "has"}
#: --can and --is answer 0 (yes) or 2 (no); 1 is an error.
ANSWER = (0, 2)


def test_is_can_exit_codes(nbdkit_server, pynbd_server) -> None:
    # (server, --is read-only's answer)
    servers = [(nbdkit_server("-r", "null", "1M"), 0), (pynbd_server("memory", "1M"), 2),
               (pynbd_server("-r", "--no-sr", "memory", "1M"), 0)]
    for srv, read_only in servers:
        for name in CAN_NAMES:
            same("--can", name, srv.uri, rc=1 if name in NOT_NAMES else ANSWER)
        same("--can", "write", srv.uri, rc=2 if read_only == 0 else 0)
        same("--is", "read-only", srv.uri, rc=read_only)
        same("--is", "tls", srv.uri, rc=2)


# --------------------------------------------------------------------------- qemu-nbd


@pytest.fixture
def qcow2_chain(tmp_path: Path) -> Path:
    """A qcow2 over a backing file, with a dirty bitmap: all three map kinds have content."""
    qemu_img, qemu_io = require("qemu-img"), require("qemu-io")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run_peer(qemu_img, "create", "-q", "-f", "qcow2", base, "4M")
    run_peer(qemu_io, "-f", "qcow2", "-c", "write -P 1 0 64k", base)
    run_peer(qemu_img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    run_peer(qemu_io, "-f", "qcow2", "-c", "write -P 2 1M 128k", top)
    run_peer(qemu_img, "bitmap", "--add", top, "b0")
    run_peer(qemu_io, "-f", "qcow2", "-c", "write -P 3 2M 64k", top)
    return top


def test_qemu_nbd(qemu_nbd_server, qcow2_chain: Path) -> None:
    srv = qemu_nbd_server(qcow2_chain, "-t", "-f", "qcow2", "-A", "-B", "b0", "-D",
                          "a \"quoted\" description", export="disk")
    for mode in MODES:
        same(*mode, srv.uri)
    doc = same_json(srv.uri)
    assert isinstance(doc, dict)
    export = doc["exports"][0]
    assert export["description"] == 'a "quoted" description'
    assert export["contexts"] == ["base:allocation", "qemu:allocation-depth",
                                  "qemu:dirty-bitmap:b0"]
    for ctx in ("qemu:allocation-depth", "qemu:dirty-bitmap:b0"):
        same(f"--map={ctx}", srv.uri)
        same("--colour", f"--map={ctx}", "--totals", srv.uri)
        same_json(f"--map={ctx}", srv.uri)
        same_json(f"--map={ctx}", "--totals", srv.uri)
    same("--map=qemu:dirty-bitmap:nope", srv.uri, rc=1)
    same("--size", srv.uri.replace("/disk?", "/other?"), rc=1)


# --------------------------------------------------------------------------- --list


def test_list_many_exports(nbdkit_server, pynbd_server, tmp_path: Path) -> None:
    d = tmp_path / "exports"
    d.mkdir()
    (d / "a.img").write_bytes(bytes(2 << 20))
    (d / "b.txt").write_text("hello\n")
    (d / "c d.bin").write_bytes(bytes(range(256)) * 40)
    for srv in (nbdkit_server("file", f"dir={d}"), pynbd_server("file", f"dir={d}")):
        same("--list", srv.uri)
        same("--list", "--content", srv.uri)
        same_json("--list", "--content", srv.uri)
        same(srv.uri, rc=1)  # no default export: the error, the suggestion, exit 1
        same("--json", srv.uri, rc=1)
        same("--map", srv.uri.replace(":///", ":///a.img"))


def test_list_with_descriptions() -> None:
    require("nbdkit")
    cmd = ["[", "nbdkit", "--filter=exportname", "memory", "1M", "exportname=a",
           "exportname=b", "exportdesc=fixed:hello there", "exportname-list=explicit", "]"]
    same("-L", "--", *cmd)
    same_json("-L", "--", *cmd)


# --------------------------------------------------------------------------- [ CMD ]


def test_subprocess_servers(tmp_path: Path) -> None:
    require("nbdkit")
    pynbd = [*PYNBD, "serve"]
    same("--", "[", "nbdkit", "memory", "1M", "]")
    same_json("--", "[", "nbdkit", "-r", "pattern", "3M", "]")
    same("--", "[", *pynbd, "memory", "1M", "]")
    same("--map", "--totals", "--", "[", *pynbd, "null", "2G", "]")
    same("--can", "write", "--", "[", *pynbd, "-r", "memory", "1M", "]", rc=2)
    image = tmp_path / "disk.qcow2"
    run_peer(require("qemu-img"), "create", "-q", "-f", "qcow2", image, "1M")
    same("--map", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", str(image), "]")


# --------------------------------------------------------------------------- errors


def test_connection_errors(tmp_path: Path) -> None:
    port = free_tcp_port()
    same(f"nbd://127.0.0.1:{port}/", rc=1)
    same("--can", "connect", f"nbd://127.0.0.1:{port}/", rc=1)
    same("--can", "teleport", f"nbd://127.0.0.1:{port}/", rc=1)  # connecting comes first
    same("notauri", rc=1)
    same(f"nbd+unix:///?socket={tmp_path}/nothing-here", rc=1)


@pytest.mark.parametrize("args", [
    ["--list", "--size", "nbd://x"], ["--map", "--can", "zero", "nbd://x"],
    ["--is", "tls", "--size", "nbd://x"], ["--content", "--no-content", "nbd://x"],
    ["--totals", "nbd://x"],
])
def test_option_conflicts(args: list[str]) -> None:
    same(*args, raw=True, rc=1)


@pytest.mark.parametrize("args", [
    ["--bogus", "nbd://x"], ["-x", "nbd://x"], ["--can"], ["--json=1", "nbd://x"],
    ["--co", "nbd://x"], ["--no-c", "nbd://x"], ["--l", "nbd://x"], ["--map", "--to=1", "u"],
    [], ["a", "b"], ["[", "]"], ["--bogus=x", "nbd://x"], ["--s=x", "nbd://x"],
])
def test_usage_errors(args: list[str]) -> None:
    """nbdinfo prints getopt's line and then its whole usage text; pynbd info prints one line:
    getopt's words (when there are any) and a pointer to --help. Same exit status."""
    want, got = nbdinfo(*args), pynbd_info(*args)
    assert (got.rc, got.out) == (want.rc, want.out) == (1, "")
    assert got.err.count("\n") == 1
    first = want.err.split("\n", 1)[0]
    if first:  # getopt's own message; a missing or extra operand gets only the usage text
        assert got.err.startswith(first + ". Try 'pynbd info --help'.")


def test_option_lists() -> None:
    same("--long-options")
    same("--short-options")
    assert same("--js", "--size", "--", "[", *PYNBD, "serve", "null", "1", "]").out == "1\n"


def test_version() -> None:
    want, got = nbdinfo("--version"), pynbd_info("--version")
    assert want.out.splitlines()[1] == got.out.splitlines()[1] == "libnbd 1.14.2"
    assert got.out.splitlines()[0].startswith("pynbd info ")


def test_command_runs_as_a_process(pynbd_server) -> None:
    """The installed command, not just main(): same bytes as nbdinfo."""
    srv = pynbd_server("memory", "1M")
    fill(srv.uri)
    cp = run_peer(sys.executable, "-m", "pynbd", "info", "--map", srv.uri)
    assert cp.stdout.decode() == nbdinfo("--map", srv.uri).out


def test_nbd_server(nbd_server, tmp_path: Path) -> None:
    """Debian's nbd-server: no structured replies, an export list, a read-only export."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xeb\x3c\x90mkfs.fat" + bytes(1 << 20))
    srv = nbd_server(image, export="disk", readonly=True)
    for mode in MODES:  # no structured replies: --map fails; listing is not allowed: -L fails
        same(*mode, srv.uri, rc=1 if "--map" in mode or "-L" in mode else 0)
    same_json(srv.uri)
    same_json("-L", srv.uri, rc=1)
    for name, answer in (("write", 2), ("read-only", 0), ("trim", ANSWER), ("flush", ANSWER),
                         ("sr", 2), ("multi-conn", ANSWER)):
        same("--can", name, srv.uri, rc=answer)
