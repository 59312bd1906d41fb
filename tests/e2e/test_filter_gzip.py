"""The gzip filter in one process: the file is decompressed once for every connection, the
plugin is opened read-only, a failed attempt is tried again by the next connection, a
plugin whose size changes is refused."""

from __future__ import annotations

import gzip

import pytest

from pynbd.errors import CommandError
from pynbd.filters.gzip import GzipFilter
from pynbd.server.backend import Chain
from tests.e2e.shape_chain import Disk, manual_of, open_chain

RAW = bytes(range(256)) * 5000 + b"end"


def test_decompressed_once() -> None:
    disk = Disk(gzip.compress(RAW))
    chain, first = open_chain(disk, (GzipFilter, []))
    second = chain.open(False, "", False)
    reads = len(disk.named("pread"))
    assert first.get_size() == second.get_size() == len(RAW)
    assert bytes(second.pread(3, len(RAW) - 3)) == b"end"
    assert bytes(first.pread(1000, 100_000)) == RAW[100_000:101_000]
    assert len(disk.named("pread")) == reads  # served from the temporary file
    assert not first.can_write() and first.can_multi_conn()
    first.close()
    second.close()
    chain.cleanup()


def test_failure_then_retry() -> None:
    good = gzip.compress(RAW)
    disk = Disk(good[:len(good) // 2])
    chain = Chain(disk, [GzipFilter()])
    chain.config_complete()
    chain.get_ready()
    with pytest.raises(CommandError) as e:
        chain.open(False, "", False)
    assert e.value.message == "gzip: inflate: unknown error: -5"
    disk.data = bytearray(good)  # the next connection decompresses again
    ctx = chain.open(False, "", False)
    assert ctx.get_size() == len(RAW)
    disk.data += b"\0" * 8  # the plugin changes size: the server must be restarted
    other = chain.open(False, "", False)
    with pytest.raises(CommandError) as e:
        other.get_size()
    assert "plugin size changed unexpectedly" in e.value.message
    ctx.close()
    other.close()
    chain.cleanup()


def test_manual() -> None:
    assert "TMPDIR" in manual_of("gzip")
