"""The cacheextents filter side by side with nbdkit's: clients see the plugin's extents,
whether answered from the cache or not, and writes are never hidden by a stale cache.
(That the plugin is asked less is shown in tests/e2e/test_filter_cacheextents.py.)"""

from __future__ import annotations

from pathlib import Path

from tests.interop.shape_compare import Factory, assert_same_many

KiB = 1024
MiB = 1024 * KiB
REQ_ONE = 8


def test_same_extents(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    extents = tmp_path / "extents"
    extents.write_text("0 64K\n64K 64K hole,zero\n128K 4K zero\n132K 60K\n")
    walk = [("extents", MiB, 0, REQ_ONE), ("extents", MiB - 64 * KiB, 64 * KiB, REQ_ONE),
            ("extents", 4096, 128 * KiB, REQ_ONE), ("extents", 100, 10), ("extents", MiB, 0),
            ("extents", 512 * KiB, 256 * KiB)]
    views = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=cacheextents", "--filter=extentlist", "null", "1M",
          f"extentlist={extents}"], walk),
        (["--filter=cacheextents", "memory", "1M"], [
            ("extents", MiB, 0), ("pwrite", b"x" * 10, 100 * KiB), ("extents", MiB, 0),
            ("extents", 4096, 100 * KiB, REQ_ONE), ("zero", 32 * KiB, 96 * KiB),
            ("extents", 4096, 100 * KiB), ("trim", MiB, 0), ("extents", MiB, 0)]),
    ])
    assert views[0]["results"][:3] == [["extents", [64 * KiB, 0]],
                                       ["extents", [64 * KiB, 3]], ["extents", [4096, 2]]]
    memory = views[1]["results"]
    assert memory[0] == ["extents", [MiB, 3]]
    assert memory[3] == ["extents", [4096, 0]]  # the write is seen, not the cached hole
