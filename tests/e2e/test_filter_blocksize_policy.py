"""The blocksize-policy filter in one process: how the advertised constraints combine
the settings with the plugin's, and what the error policy refuses (with its messages)."""

from __future__ import annotations

import errno

import pytest

from pynbd.errors import CommandError
from pynbd.filters.blocksize_policy import BlocksizePolicyFilter
from tests.e2e.shape_chain import Disk, manual_of, open_chain

MAX = 0xFFFFFFFF


@pytest.mark.parametrize("plugin,params,want", [
    (None, [], None),
    (None, ["blocksize-minimum=512"], (512, 4096, MAX)),
    (None, ["blocksize-maximum=8K"], (1, 4096, 8192)),
    ((512, 4096, 65536), [], (512, 4096, 65536)),
    ((512, 4096, 65536), ["blocksize-preferred=8K"], (512, 8192, 65536)),
    ((512, 4096, 65536), ["blocksize-minimum=4K", "blocksize-maximum=1M"],
     (4096, 4096, 1 << 20)),
    ((512, 4096, 65536), ["blocksize-minimum=1", "blocksize-preferred=512",
                          "blocksize-maximum=1024"], (1, 512, 1024)),
])
def test_constraints(plugin: tuple[int, int, int] | None, params: list[str],
                     want: tuple[int, int, int] | None) -> None:
    disk = Disk(65536, block_size=plugin)
    _, ctx = open_chain(disk, (BlocksizePolicyFilter, params))
    assert ctx.block_size() == want


def test_invalid_combination() -> None:
    disk = Disk(65536, block_size=(512, 4096, 65536))
    _, ctx = open_chain(disk, (BlocksizePolicyFilter, ["blocksize-maximum=2K"]))
    with pytest.raises(CommandError, match="computed block size values are invalid, "
                                           "minimum 512 > preferred 4096 or preferred > "
                                           "maximum 2048"):
        ctx.block_size()


def test_error_policy() -> None:
    disk = Disk(65536, extents=[(0, 65536, 0)])
    _, ctx = open_chain(disk, (BlocksizePolicyFilter, [
        "blocksize-error-policy=error", "blocksize-minimum=512", "blocksize-maximum=4K"]))
    cases = [
        (lambda: ctx.pread(100, 0), ("client pread request rejected: count 100 is smaller "
                                    "than minimum size 512")),
        (lambda: ctx.pwrite(b"x" * 8192, 0), ("client pwrite request rejected: count 8192 is "
                                             "larger than maximum size 4096")),
        (lambda: ctx.zero(1000, 0), ("client zero request rejected: count 1000 is not a "
                                    "multiple of minimum size 512")),
        (lambda: ctx.trim(512, 100), ("client trim request rejected: offset 100 is not "
                                     "aligned to a multiple of minimum size 512")),
        (lambda: ctx.cache(511, 0), ("client cache request rejected: count 511 is smaller "
                                    "than minimum size 512")),
        (lambda: ctx.extents(512, 1), ("client extents request rejected: offset 1 is not "
                                      "aligned to a multiple of minimum size 512")),
    ]
    for call, message in cases:
        with pytest.raises(CommandError) as e:
            call()
        assert (e.value.errno, e.value.message) == (errno.EINVAL, message)
    assert disk.calls == []  # the plugin never saw them
    ctx.zero(8192, 0)  # the maximum is only about reads and writes
    ctx.extents(8192, 0)
    assert [c[0] for c in disk.calls] == ["zero", "extents"]


def test_manual() -> None:
    text = manual_of("blocksize-policy")
    for key in ("blocksize-error-policy", "blocksize-minimum", "blocksize-preferred",
                "blocksize-maximum"):
        assert key in text
