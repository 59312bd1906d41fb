"""The noextents filter side by side with nbdkit's: everything is reported as data."""

from __future__ import annotations

from pathlib import Path

from tests.interop.shape_compare import Factory, assert_same_many

MiB = 1024 * 1024


def test_all_data(pynbd_server: Factory, nbdkit_server: Factory, tmp_path: Path) -> None:
    extents = tmp_path / "extents"
    extents.write_text("0 64K\n64K 64K hole,zero\n")
    ops = [("extents", MiB, 0), ("extents", 4096, 65536, 8), ("pwrite", b"x", 1000),
           ("extents", 100, 999), ("pread", 2, 999)]
    views = assert_same_many(pynbd_server, nbdkit_server, [
        (["--filter=noextents", "memory", "1M"], ops),
        (["--filter=noextents", "--filter=extentlist", "null", "1M",
          f"extentlist={extents}"], ops),
        (["--filter=noextents", "memory", "1M"], ops[:1]),
    ])
    for view in views:
        assert view["base_allocation"] is True  # still offered: only the answers change
        assert view["results"][0] == ["extents", [MiB, 0]]
    # without the filter, the same plugins report their holes
    holes = assert_same_many(pynbd_server, nbdkit_server, [
        (["memory", "1M"], ops[:1]),
        (["--filter=extentlist", "null", "1M", f"extentlist={extents}"], ops[:1])])
    assert [v["results"][0][1][-1] for v in holes] == [3, 3]
