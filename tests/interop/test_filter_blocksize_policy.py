"""The blocksize-policy filter side by side with nbdkit's: the block sizes advertised, the
error policy for requests that break them, and the parameters."""

from __future__ import annotations

from tests.interop.shape_compare import (
    Factory,
    assert_same_many,
    assert_same_open,
    assert_same_shape,
    bad_params,
    infos,
)

KiB = 1024
MiB = 1024 * KiB
POLICY = "--filter=blocksize-policy"


def test_advertised(pynbd_server: Factory, nbdkit_server: Factory) -> None:
    cases = [
        (["blocksize-minimum=512"], (512, 4096, 0xFFFFFFFF)),
        (["blocksize-preferred=64K"], (1, 65536, 0xFFFFFFFF)),
        (["blocksize-maximum=1M"], (1, 4096, MiB)),
        (["blocksize-minimum=4K", "blocksize-preferred=8K", "blocksize-maximum=1M"],
         (4096, 8192, MiB)),
        (["blocksize-minimum=0"], None),  # 0 is "not set": the plugin's (none)
    ]
    got = infos(pynbd_server, nbdkit_server, [[POLICY, "memory", "1M", *a] for a, _ in cases])
    for (args, want), (mine, theirs) in zip(cases, got, strict=True):
        if want is None:
            assert "block_size_minimum" not in theirs
            continue
        assert tuple(theirs[f"block_size_{k}"] for k in ("minimum", "preferred",
                                                         "maximum")) == want, args
        # pynbd's server advertises at most its 32M request limit
        assert (mine["block_size_minimum"], mine["block_size_preferred"],
                mine["block_size_maximum"]) == (want[0], want[1], min(want[2], 32 * MiB))


def test_over_a_plugin_with_constraints(pynbd_server: Factory, nbdkit_server: Factory) -> None:
    """Over blocksize (which advertises 1/4096/2^32-1): the settings given replace its."""
    [(mine, theirs)] = infos(pynbd_server, nbdkit_server, [[
        POLICY, "--filter=blocksize", "memory", "1M", "blocksize-preferred=16K",
        "blocksize-maximum=64K"]])
    for info in (mine, theirs):
        assert (info["block_size_minimum"], info["block_size_preferred"],
                info["block_size_maximum"]) == (1, 16384, 65536)


def test_inconsistent_settings_fail_the_connection() -> None:
    sizes = assert_same_open([
        [POLICY, "memory", "1M", "blocksize-minimum=64K"],
        [POLICY, "memory", "1M", "blocksize-maximum=1K"],
        [POLICY, "--filter=blocksize", "memory", "1M", "blocksize-maximum=2K"],
        [POLICY, "memory", "1M", "blocksize-minimum=8K", "blocksize-preferred=8K"],
    ])
    assert sizes == [None, None, None, MiB]


BAD_REQUESTS = [
    ("pread", 512, 0), ("pread", 100, 0), ("pread", 1000, 0), ("pread", 512, 100),
    ("pread", 8192, 0), ("pwrite", b"x" * 512, 512), ("pwrite", b"x" * 8192, 0),
    ("pwrite", b"x" * 100, 0), ("zero", 8192, 0), ("zero", 100, 512), ("trim", 8192, 0),
    ("trim", 512, 3), ("cache", 8192, 0), ("cache", 10, 0), ("extents", 8192, 0),
    ("extents", 512, 10), ("flush",), ("pread", 1024, 0),
]


def test_error_policy(pynbd_server: Factory, nbdkit_server: Factory) -> None:
    """With error, requests smaller than the minimum, unaligned, or reads and writes
    larger than the maximum fail with EINVAL; the maximum does not apply to zero, trim,
    cache and extents. libnbd's own checks are off, so the requests reach the server."""
    view = assert_same_shape(pynbd_server, nbdkit_server, [
        POLICY, "memory", "1M", "blocksize-error-policy=error", "blocksize-minimum=512",
        "blocksize-maximum=4K"], BAD_REQUESTS, strict=False)
    errors = [i for i, r in enumerate(view["results"]) if r == ["error", 22]]
    assert errors == [1, 2, 3, 4, 6, 7, 9, 11, 13, 15]


def test_allow_policy(pynbd_server: Factory, nbdkit_server: Factory) -> None:
    """With allow (the default), reads and writes over the maximum reach the plugin.
    (Unaligned requests too under nbdkit; pynbd's server refuses those itself, EINVAL,
    whatever the filter says: not compared here.)"""
    ops = [("pread", 8192, 0), ("pwrite", b"y" * 8192, 4096), ("pread", 512, 8192)]
    views = assert_same_many(pynbd_server, nbdkit_server, [
        ([POLICY, "memory", "1M", "blocksize-minimum=512", "blocksize-maximum=4K", *policy],
         ops, {"strict": False}) for policy in ([], ["blocksize-error-policy=allow"])])
    for view in views:
        assert view["results"][2] == ["data", b"y" * 512]


def test_no_settings_is_transparent(pynbd_server: Factory, nbdkit_server: Factory) -> None:
    assert_same_many(pynbd_server, nbdkit_server, [
        ([POLICY, "memory", "1M", "blocksize-error-policy=error"],
         [("pread", 3, 1), ("pwrite", b"z", 7), ("pread", 8, 0), ("extents", 100, 3)]),
    ])


def test_bad_parameters() -> None:
    bad_params([
        [POLICY, "null", "blocksize-error-policy=deny"],
        [POLICY, "null", "blocksize-error-policy="],
        [POLICY, "null", "blocksize-minimum=x"],
        [POLICY, "null", "blocksize-minimum=8G"],
        [POLICY, "null", "blocksize-preferred=-1"],
        [POLICY, "null", "blocksize-maximum=4294967296"],
        [POLICY, "null", "blocksize-minimum=3"],
        [POLICY, "null", "blocksize-minimum=128K"],
        [POLICY, "null", "blocksize-preferred=1000"],
        [POLICY, "null", "blocksize-preferred=256"],
        [POLICY, "null", "blocksize-preferred=64M"],
        [POLICY, "null", "blocksize-minimum=8K", "blocksize-preferred=4K"],
        [POLICY, "null", "blocksize-preferred=8K", "blocksize-maximum=4K"],
    ])
