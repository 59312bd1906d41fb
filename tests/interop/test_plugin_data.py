"""data side by side with nbdkit's: the same data strings serve the same size, bytes and
extents; bad strings get nbdkit's messages. Also the memory plugin's other allocators."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import require, run_pynbd
from side_by_side import assert_same

pytestmark = pytest.mark.timeout(120)

READ = [("size",), ("pread", 512, 0), ("extents", 1 << 20, 0)]

STRINGS = [
    ["1 2 @10 @-5"], ["( @10 )*2"], ["1 2 3 @^8"], ["( 1 2 @^4 )*2"], ["1 -> \\a \\a \\a"],
    ["1 2 3 @1 9"], ['"ab"*2[1:]'], ["( 1 2 3 )[1:2]"], ["1 2 3[1:]"], ["<(printf abc)"],
    ["@+3 1"], ["1", "size=10"], ["1 # a comment", "size=3"], ["$x", "x=1 $y", "y=2"],
    ["base64=AQIDBA=="], [" ( 0x55 0xAA )*2048 "], [' ( "Hello" )*2000 ', "size=8192"],
    ["@0x1be 0 0 2 0 0x83 0x20 0x20 0 le32:1 le32:0x7ff @0x1fe 0x55 0xaa", "size=1M"],
    ["0 1 2 3 @^0x200 @-2 le16:0xaa55"], ["be16:1 le32:0x01020304 be64:0x0102030405060708"],
    [(" ( 0x55 0xAA ) -> \\boot-signature ( @0x1fe \\boot-signature ) -> \\sector "
     "\\sector \\sector ")],
    ["$pattern*16", "pattern=0x55 0xAA"],
    [' <( i=0; while :; do printf "%04d" $i; i=$((i+1)); done )[:32768] '],
    ["raw=Hello, world!"], ["0xff*100000", "size=1M"], ['"a\\tb\\\\c\\"d"'],
    ["( 1 2 3 4 5 6 7 8 )[2:5]*3 be16:0x102"], ["1 @70000 2", "allocator=zstd"],
    ["1 @70000 2", "allocator=malloc"],
]


@pytest.mark.parametrize("args", STRINGS, ids=lambda a: " ".join(a)[:40])
def test_data_as_nbdkit(pynbd_server, nbdkit_server, args: list[str]) -> None:
    ops = READ if "allocator=zstd" not in args else READ[:2]  # nbdkit 1.32: zstd extents crash
    assert_same(pynbd_server, nbdkit_server, ["data", *args], ops=ops)


def test_data_files_as_nbdkit(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    (tmp_path / "f1").write_bytes(b"hello")
    (tmp_path / "f2").write_bytes(bytes(range(256)) * 3)
    d = f" <{tmp_path}/f1 @^512 <{tmp_path}/f2 @^512 <{tmp_path}/f2[:16]*4 "
    assert_same(pynbd_server, nbdkit_server, ["data", d], ops=READ)


def test_data_writes_as_nbdkit(pynbd_server, nbdkit_server) -> None:
    ops = [("pwrite", b"xyz" * 100, 10), ("zero", 4096, 65536), ("trim", 100, 0),
           ("pread", 1024, 0), ("extents", 1 << 20, 0), ("flush",)]
    assert_same(pynbd_server, nbdkit_server, ["data", "1 2 3 @70000 4", "size=1M"], ops=ops)


@pytest.mark.parametrize("args", [
    ["1M", "allocator=malloc"], ["1M", "allocator=malloc,mlock=true"], ["1M", "allocator=zstd"]])
def test_memory_allocators_as_nbdkit(pynbd_server, nbdkit_server, args: list[str]) -> None:
    ops = [("pwrite", b"x" * 5000, 70000), ("zero", 40000, 0), ("trim", 4096, 65536),
           ("pread", 1 << 20, 0), ("flush",)]
    if "allocator=zstd" not in args:
        ops.append(("extents", 1 << 20, 0))
    assert_same(pynbd_server, nbdkit_server, ["memory", *args], ops=ops)


def test_memory_zstd_extents(pynbd_server) -> None:
    """nbdkit 1.32 crashes on block status with allocator=zstd; pynbd reports the holes."""
    from side_by_side import probe
    srv = pynbd_server("memory", "1M", "allocator=zstd")
    got = probe(srv.uri, [("pwrite", b"x" * 5000, 70000), ("extents", 1 << 20, 0)])
    assert got["results"][1] == ["extents", [65536, 3, 32768, 0, 950272, 3]]


@pytest.mark.parametrize("args, message", [
    (["data", "@10 @-20"], "data parameter @-20 must not be larger than the current offset 10"),
    (["data", "( 1"], "unmatched '(' in data string"),
    (["data", ")"], "unmatched ')' in data string"),
    (["data", "256"], "data parameter BYTE must be in the range 0..255"),
    (["data", "le16:0x10000"], 'data: could not parse number: "0x10000"'),
    (["data", "le32:-1"], "data: negative numbers are not allowed"),
    (["data", "\\foo"], "\\foo not defined"),
    (["data", "$z"], "$z: variable not found"),
    (["data", "1 2 3 4[2:5]"], "[N:M] does not describe a valid slice"),
    (["data", "1", "base64=AQ=="], "raw|base64|data parameter must be specified exactly once"),
    (["data", "size=1M"], "raw|base64|data parameter was not specified"),
    (["memory", "1M", "allocator=foo"], 'unknown allocator "foo"'),
    (["memory", "1M", "allocator=malloc,x=1"], 'unknown allocator "malloc,x=1"'),
    (["memory", "1M", "allocator=sparse,x=1"], "allocator=sparse does not take extra param"),
    (["memory", "1M", "allocator=malloc,mlock=maybe"], "could not decipher boolean (maybe)"),
])
def test_bad_parameters_as_nbdkit(sockdir: Path, args: list[str], message: str) -> None:
    mine = run_pynbd("serve", "-f", "-U", sockdir / "p", *args, check=False)
    theirs = subprocess.run([require("nbdkit"), "-f", "-U", sockdir / "n", *args],
                            capture_output=True, check=False, timeout=60)
    assert mine.returncode == theirs.returncode == 1
    assert message in mine.stderr.decode() and message in theirs.stderr.decode()
    assert b"Traceback" not in mine.stderr
