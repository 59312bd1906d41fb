"""The tar filter in one process: only member headers are read to find the entry (the data
of other members is skipped), tar-limit bounds the search, the entry is found once for
all connections, requests are moved to the entry's data."""

from __future__ import annotations

import io
import tarfile

import pytest

from pynbd.errors import CommandError
from pynbd.filters.tar import TarFilter
from tests.e2e.shape_chain import Disk, manual_of, open_chain


def _tar(*members: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


BIG = b"\x01" * 1_000_000
TAR = _tar(("big.bin", BIG), ("disk.img", b"disk" * 1000))


def test_headers_only_and_found_once() -> None:
    disk = Disk(TAR)
    chain, ctx = open_chain(disk, (TarFilter, ["tar-entry=disk.img"]))
    read = sum(c[1] for c in disk.named("pread"))
    assert read < 20_000  # the megabyte of big.bin was skipped, not read
    second = chain.open(False, "", False)
    assert sum(c[1] for c in disk.named("pread")) == read
    assert ctx.get_size() == 4000 and bytes(second.pread(8, 3992)) == b"diskdisk"
    start = TAR.index(b"disk" * 1000)
    ctx.pwrite(b"DISK", 4)
    assert disk.data[start:start + 12] == b"diskDISKdisk"
    ctx.zero(4, 0)
    assert disk.named("zero")[-1][1:3] == (4, start)
    ctx.close()
    second.close()


def test_tar_limit() -> None:
    where = TAR.index(b"disk" * 1000)
    with pytest.raises(CommandError) as e:
        open_chain(Disk(TAR), (TarFilter, ["tar-entry=disk.img", "tar-limit=500K"]))
    assert e.value.message.startswith("tar subcommand failed")
    _, ctx = open_chain(Disk(TAR), (TarFilter, ["tar-entry=disk.img", f"tar-limit={where}"]))
    assert ctx.get_size() == 4000


def test_sparse_member_refused() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("s.img")
        info.size = 0
        t.addfile(info)
    raw = bytearray(buf.getvalue())
    raw[156:157] = b"S"  # GNU sparse file type
    header = raw[:512]
    header[148:156] = b" " * 8
    raw[148:156] = f"{sum(header):06o}\0 ".encode()
    with pytest.raises(CommandError) as e:
        open_chain(Disk(bytes(raw)), (TarFilter, ["tar-entry=s.img"]))
    assert "sparse" in e.value.message


def test_manual() -> None:
    text = manual_of("tar")
    assert "tar-entry=PATH_INSIDE_TAR" in text and "tar-limit=SIZE" in text
