"""The cow filter side by side with nbdkit's: what a client sees, the plugin's file left as
it was, the overlay's block size in extents and block size, cow-on-read and cow-on-cache
over a file changed behind the server's back, its parameters, and the one difference (zero
is advertised)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from pynbd.limits import MAX_PAYLOAD_ADVERTISED
from tests.e2e.caching_helpers import (
    assert_same_errors,
    libnbd_steps,
    parallel,
    run_both,
    same_on_files,
)
from tests.helpers import run_peer

KiB = 1024
MiB = 1 << 20
FUA, REQ_ONE = 1, 8

#: Unaligned writes, trims (whole and partial blocks), prefetch, flush, extents.
OPS = [("size",), ("pread", 4096, 0), ("pwrite", b"\1" * 1000, 100),
       ("pwrite", b"\2" * 30000, 60000, FUA), ("pread", 100000, 0), ("trim", 200000, 300000),
       ("trim", 1000, 5000), ("pread", 300000, 200000), ("cache", 100000, 600000),
       ("flush",), ("extents", MiB, 0), ("extents", MiB, 0, REQ_ONE), ("pread", MiB, 0)]
# (No extents request smaller than a block: pynbd's server ends the last extent at the end
# of the request, nbdkit's sends the block's whole; both are allowed, and neither is this
# filter's doing.)


def zero_advertised(view: dict[str, Any]) -> None:
    """nbdkit 1.32's cow filter implements zero but asks the plugin (opened read-only)
    whether to advertise it: never. pynbd's advertises it (and fast zero, refused)."""
    if view["flags"]["is_read_only"]:
        return
    assert (view["flags"]["can_zero"], view["flags"]["can_fast_zero"]) == (False, False)
    view["flags"]["can_zero"] = view["flags"]["can_fast_zero"] = True


def test_what_clients_see(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    image = tmp_path / "image"
    data = bytearray(random.Random(4).randbytes(MiB))
    data[512 * KiB:768 * KiB] = bytes(256 * KiB)
    image.write_bytes(data)
    cases = [[], ["cow-block-size=4K"], ["cow-block-size=1M", "cow-on-read=true"],
             ["cow-on-cache=true"]]
    parallel(lambda i, params: same_on_files(
        pynbd_server, nbdkit_server, ["--filter=cow", "file", "{disk}", *params], OPS, image,
        zero_advertised, tag=str(i)), list(enumerate(cases)))
    assert image.read_bytes() == data


def test_over_plugins_without_writes_or_extents(pynbd_server, nbdkit_server,
                                                 tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(random.Random(5).randbytes(MiB))
    same_on_files(pynbd_server, nbdkit_server, ["--filter=cow", "-r", "file", "{disk}"],
                  [("pread", 512, 0), ("pwrite", b"x", 0), ("extents", MiB, 0)], image,
                  zero_advertised)
    same_on_files(pynbd_server, nbdkit_server,
                  ["--filter=cow", "pattern", "1M", "cow-block-size=8K"],
                  [op for op in OPS if op[0] != "cache"], image, zero_advertised)


def test_block_size(pynbd_server, nbdkit_server) -> None:
    sizes = {}
    for name, factory in (("pynbd", pynbd_server), ("nbdkit", nbdkit_server)):
        for params in ([], ["cow-block-size=256K"]):
            srv = factory("--filter=cow", "memory", "1M", *params)
            info = json.loads(run_peer("nbdinfo", "--json", srv.uri).stdout)["exports"][0]
            sizes[name, len(params)] = [info[f"block_size_{k}"]
                                        for k in ("minimum", "preferred", "maximum")]
            srv.stop()
    # pynbd's server advertises at most the largest request it takes (MAX_PAYLOAD_ADVERTISED)
    for params, preferred in ((0, 64 * KiB), (1, 256 * KiB)):
        assert sizes["nbdkit", params] == [1, preferred, 0xFFFFFFFF]
        assert sizes["pynbd", params] == [1, preferred, MAX_PAYLOAD_ADVERTISED]


_STALE = """
path, flag, prefetch = args
def change(byte):
    with open(path, 'r+b') as f:
        f.write(bytes([byte]) * 4096)
for step in range(4):
    if flag and step == 2:
        open(flag, 'w').close()
    if prefetch == "1":
        h.cache(4096, 0)
    change(step)
    out.append(h.pread(16, 0).hex())
"""


def test_copies_into_the_overlay(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    """cow-on-read and cow-on-cache: data copied into the overlay is not read from the
    plugin again (a file changed behind the server shows it)."""

    def run(i: int, params: list[str], flag: bool, prefetch: str, name: str) -> list[str]:
        disk, flagfile = tmp_path / f"{name}{i}.img", tmp_path / f"{name}{i}.flag"
        disk.write_bytes(bytes(MiB))
        srv = (pynbd_server if name == "pynbd" else nbdkit_server)(
            "--filter=cow", "file", disk, *(p.format(flag=flagfile) for p in params))
        try:
            return libnbd_steps(srv.uri, _STALE, str(disk), str(flagfile) if flag else "",
                                prefetch)
        finally:
            srv.stop()

    cases = [([], False, "0"), (["cow-on-read=true"], False, "0"),
             (["cow-on-read={flag}"], True, "0"), (["cow-on-cache=true"], False, "1"),
             (["cow-on-cache=false"], False, "1")]
    got = parallel(run, [(i, *case, name) for i, case in enumerate(cases)
                         for name in ("pynbd", "nbdkit")])
    assert got[::2] == got[1::2]
    fresh = ["00" * 16, "01" * 16, "02" * 16, "03" * 16]
    assert got[1::2] == [fresh, ["00" * 16] * 4, ["00" * 16, "01" * 16, "02" * 16, "02" * 16],
                         ["00" * 16] * 4, fresh]


def test_parameters_and_their_messages(tmp_path: Path) -> None:
    seen = assert_same_errors(["--filter=cow", "memory", "1M"], [
        ["cow-block-size=1000"], ["cow-block-size=4G"], ["cow-block-size=2G"],
        ["cow-block-size=x"], ["cow-block-size=-4096"], ["cow-on-cache=maybe"],
        ["cow-on-read=relative/path"], ["cow-on-read=/nonexistent"]])
    assert seen[0] == (1, "cow-block-size is out of range (4096..2G) or not a power of 2")
    assert [rc for rc, _ in seen] == [1, 1, 0, 1, 1, 1, 1, 0]
    both = run_both(["--filter=cow", "memory", "1M"],
                    env={"TMPDIR": str(tmp_path / "nonexistent")})
    assert both["pynbd"] == both["nbdkit"] == (
        1, f"mkostemp: {tmp_path}/nonexistent: No such file or directory")


def test_copy_out_the_changes(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    """Write through cow with nbdcopy, copy the whole disk out again: the copy has the
    changes, the plugin's file does not."""
    base = tmp_path / "base"
    base.write_bytes(random.Random(6).randbytes(2 * MiB))
    change = tmp_path / "change"
    change.write_bytes(random.Random(7).randbytes(2 * MiB))
    for name, factory in (("pynbd", pynbd_server), ("nbdkit", nbdkit_server)):
        srv = factory("--filter=cow", "file", base)
        run_peer("nbdcopy", change, srv.uri)
        out = tmp_path / f"{name}.out"
        run_peer("nbdcopy", srv.uri, out)
        srv.stop()
        assert out.read_bytes() == change.read_bytes(), name
    assert base.read_bytes() == random.Random(6).randbytes(2 * MiB)
