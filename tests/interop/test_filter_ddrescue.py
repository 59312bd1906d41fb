"""The ddrescue filter side by side with nbdkit's: reads inside rescued blocks return the
image, others fail with EIO; the export is read-only without cache; the mapfile format."""

from __future__ import annotations

from pathlib import Path

from tests.interop.shape_compare import (
    Factory,
    assert_same_many,
    assert_same_shape,
    bad_params,
    views,
)

EIO = 5

MAPFILE = """\
# Mapfile. Created by GNU ddrescue version 1.27
# Command line: ddrescue /dev/sdb disk.img disk.map
# Start time:   2024-01-01 10:00:00
# Current time: 2024-01-01 10:05:00
# Finished
# current_pos  current_status  current_pass
0x00010000     +               1
#      pos        size  status
0x00000000  0x00001000  +
0x00001000  0x00000200  -
0x00001200  0x00000E00  +
0x00002000  0x00001000  /
0x00003000  0x00001000  +
0x00004000  0x00000200  *
16896 512 +
0x00004400  0x0000BC00  ?
"""


def setup(tmp_path: Path, text: str = MAPFILE) -> tuple[Path, Path]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 256)  # 64K
    mapfile = tmp_path / "disk.map"
    mapfile.write_text(text)
    return disk, mapfile


def test_reads(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    disk, mapfile = setup(tmp_path)
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        "--filter=ddrescue", "file", disk, f"ddrescue-mapfile={mapfile}"], [
        ("pread", 4096, 0), ("pread", 512, 4096), ("pread", 1, 4095), ("pread", 2, 4095),
        ("pread", 512, 0x1200), ("pread", 1, 0x1FFF), ("pread", 512, 0x2000),
        ("pread", 4096, 0x3000), ("pread", 512, 16896), ("pread", 1024, 16896),
        ("pread", 512, 0x4400), ("pread", 512, 0xFE00), ("extents", 65536, 0),
        ("pwrite", b"x", 0), ("zero", 512, 0), ("trim", 512, 0), ("cache", 512, 0)])
    results = view["results"]
    assert results[0] == ["data", disk.read_bytes()[:4096]]
    assert [r[0] for r in results[1:12]] == [
        "error", "data", "error", "data", "data", "error", "data", "data", "error", "error",
        "error"]
    assert results[1] == ["error", EIO]
    assert view["flags"]["is_read_only"] and not view["flags"]["can_cache"]


def test_read_across_two_rescued_blocks(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    """Blocks 0x1200-0x2000 and 0x2000-0x3000 both rescued, listed apart: nbdkit 1.32
    looks for one block holding the whole read and fails it (EIO); pynbd reads it. Reads
    inside either block are the same under both."""
    text = MAPFILE.replace("0x00002000  0x00001000  /", "0x00002000  0x00001000  +")
    disk, mapfile = setup(tmp_path, text)
    ops = [("pread", 1024, 0x1E00), ("pread", 512, 0x1E00), ("pread", 512, 0x2000)]
    mine, theirs, _ = views(pynbd_server, nbdkit_server, [
        "--filter=ddrescue", "file", disk, f"ddrescue-mapfile={mapfile}"], ops)
    assert mine["results"][0] == ["data", disk.read_bytes()[0x1E00:0x2200]]
    assert theirs["results"][0] == ["error", EIO]
    assert mine["results"][1:] == theirs["results"][1:]


def test_mapfile_details(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    """No status line seen yet: the first block line is taken as the status line (as GNU's
    format says it must come first); lines that do not parse are skipped; no mapfile
    parameter means nothing was rescued."""
    cases = {
        "no-status": "0x0000 0x1000 +\n0x1000 0x1000 +\n",
        "junk": "# c\n0 +\nstatus line\nnot a block\n0x0 0x800\n0x800\t0x800 + extra\n",
        "spaces-and-octal": "0 +\n  0   02000   +  \n010000 010 -\n",
    }
    ops = [("pread", 512, 0), ("pread", 512, 2048), ("pread", 512, 4096)]
    disk, _ = setup(tmp_path)
    runs = []
    for name, text in cases.items():
        mapfile = tmp_path / f"{name}.map"
        mapfile.write_text(text)
        runs.append((["--filter=ddrescue", "file", disk, f"ddrescue-mapfile={mapfile}"], ops))
    runs.append((["--filter=ddrescue", "file", disk], ops))
    views_ = assert_same_many(pynbd_server, nbdkit_server, runs)
    assert [r[0] for r in views_[0]["results"]] == ["error", "error", "data"]
    assert [r[0] for r in views_[-1]["results"]] == ["error"] * 3


def test_empty_rescued_block(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    """A rescued block of size 0 holds nothing. nbdkit 1.32 computes its last byte as
    start-1 and compares it unsigned: every read from its start on succeeds, bad blocks
    included. pynbd ignores the block."""
    disk, mapfile = setup(tmp_path, MAPFILE + "0x0 0x0 +\n")
    ops = [("pread", 512, 0x1000), ("pread", 512, 0xFE00), ("pread", 512, 0)]
    mine, theirs, _ = views(pynbd_server, nbdkit_server, [
        "--filter=ddrescue", "file", disk, f"ddrescue-mapfile={mapfile}"], ops)
    assert [r[0] for r in mine["results"]] == ["error", "error", "data"]
    assert [r[0] for r in theirs["results"]] == ["data", "data", "data"]


def test_bad_mapfiles(tmp_path: Path) -> None:
    cases = []
    for name, text in {"negative-offset": "0 +\n-1 0x1000 +\n",
                       "negative-length": "0 +\n0x1000 -0x10 +\n"}.items():
        p = tmp_path / name
        p.write_text(text)
        cases.append(["--filter=ddrescue", "null", "1M", f"ddrescue-mapfile={p}"])
    cases.append(["--filter=ddrescue", "null", "1M", f"ddrescue-mapfile={tmp_path}/none"])
    bad_params(cases)
