"""libnbd's nbdinfo against `pynbd serve`: text, --json, --map, --list, --size, [ CMD ].

Where it helps, the same nbdinfo command runs against nbdkit with the same plugin and the
outputs are compared (minus the socket path in `uri:`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from helpers import run_libnbd, run_peer

PYNBD_SERVE = [sys.executable, "-m", "pynbd", "serve"]
GIANT = (1 << 63) - 1


def nbdinfo(*args: str) -> str:
    return run_peer("nbdinfo", *args).stdout.decode()


def nbdinfo_json(*args: str) -> dict:
    return json.loads(nbdinfo("--json", *args))


def _strip_uri(text: str) -> str:
    return re.sub(r"\?socket=\S+", "?socket=SOCK", text)


def test_text_output(pynbd_server) -> None:
    srv = pynbd_server("memory", "1M")
    out = nbdinfo(srv.uri)
    lines = out.splitlines()
    assert lines[0] == "protocol: newstyle-fixed without TLS, using structured packets"
    assert lines[1] == 'export="":'
    assert "\texport-size: 1048576 (1M)" in lines
    assert f"\turi: {srv.uri}" in lines
    assert "\tcontexts:" in lines
    assert "\t\tbase:allocation" in lines
    assert "\tis_read_only: false" in lines
    assert "\tcan_write: true" not in lines  # not an nbdinfo field
    for flag in ("can_flush", "can_trim", "can_zero", "can_df", "can_fua", "can_multi_conn",
                 "can_cache", "can_fast_zero", "is_rotational"):
        assert any(line.startswith(f"\t{flag}: ") for line in lines), flag


@pytest.mark.parametrize(
    "args",
    [("memory", "1M"), ("null", "1M"), ("pattern", "1M"), ("-r", "memory", "64K"),
     ("memory", "1000")],
    ids=lambda a: " ".join(a),
)
def test_text_output_same_as_nbdkit(pynbd_server, nbdkit_server, args: tuple[str, ...]) -> None:
    ours = _strip_uri(nbdinfo("--no-content", pynbd_server(*args).uri))
    theirs = _strip_uri(nbdinfo("--no-content", nbdkit_server(*args).uri))
    # nbdkit 1.32 sends no block size for these plugins; pynbd advertises one (allowed).
    ours = "".join(x for x in ours.splitlines(True) if "block_size_" not in x)
    assert ours == theirs


def test_json(pynbd_server) -> None:
    srv = pynbd_server("memory", "1M")
    info = nbdinfo_json(srv.uri)
    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False
    assert info["structured"] is True
    (ex,) = info["exports"]
    assert ex["export-name"] == ""
    assert ex["export-size"] == 1 << 20
    assert ex["export-size-str"] == "1M"
    assert ex["uri"] == srv.uri
    assert "base:allocation" in ex["contexts"]
    assert ex["is_read_only"] is False
    assert ex["is_rotational"] is False
    for flag in ("can_flush", "can_trim", "can_zero", "can_df", "can_fua"):
        assert ex[flag] is True, flag
    for key in ("can_cache", "can_fast_zero", "can_multi_conn"):
        assert isinstance(ex[key], bool)
    if "block_size_minimum" in ex:
        assert ex["block_size_minimum"] <= ex["block_size_preferred"] <= ex["block_size_maximum"]


def test_json_readonly_and_pattern(pynbd_server) -> None:
    ex = nbdinfo_json(pynbd_server("-r", "memory", "1M").uri)["exports"][0]
    assert ex["is_read_only"] is True
    assert ex["can_trim"] is False and ex["can_zero"] is False
    ex = nbdinfo_json(pynbd_server("pattern", "64K").uri)["exports"][0]
    assert ex["is_read_only"] is True  # pattern is read-only by nature
    assert ex["export-size"] == 65536


def test_json_no_sr(pynbd_server) -> None:
    info = nbdinfo_json(pynbd_server("--no-sr", "memory", "1M").uri)
    assert info["structured"] is False
    ex = info["exports"][0]
    assert ex["can_df"] is False
    assert not ex.get("contexts")


def test_json_flags_same_as_nbdkit(pynbd_server, nbdkit_server, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(65536))
    for args in (("memory", "1M"), ("null", "1M"), ("pattern", "1M"), ("file", str(disk)),
                 ("-r", "file", str(disk))):
        ours = nbdinfo_json("--no-content", pynbd_server(*args).uri)["exports"][0]
        theirs = nbdinfo_json("--no-content", nbdkit_server(*args).uri)["exports"][0]
        keys = [k for k in theirs if k.startswith(("can_", "is_"))] + ["export-size", "contexts"]
        assert {k: ours.get(k) for k in keys} == {k: theirs[k] for k in keys}, args


def test_size(pynbd_server) -> None:
    assert nbdinfo("--size", pynbd_server("memory", "1M").uri).strip() == "1048576"
    assert nbdinfo("--size", pynbd_server("null", "1000").uri).strip() == "1000"
    assert nbdinfo("--size", "--json", pynbd_server("pattern", "3G").uri).strip() == str(3 << 30)


def test_can_and_is(pynbd_server) -> None:
    srv = pynbd_server("-r", "memory", "1M")
    assert run_peer("nbdinfo", "--is", "read-only", srv.uri).returncode == 0
    assert run_peer("nbdinfo", "--can", "write", srv.uri, check=False).returncode == 2
    srv = pynbd_server("memory", "1M")
    assert run_peer("nbdinfo", "--can", "write", srv.uri).returncode == 0
    assert run_peer("nbdinfo", "--can", "zero", srv.uri).returncode == 0
    assert run_peer("nbdinfo", "--can", "structured-reply", srv.uri).returncode == 0


def test_map_sparse_memory(pynbd_server, libnbd) -> None:
    srv = pynbd_server("memory", "1M")
    libnbd(
        "import nbd, sys\n"
        "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "h.pwrite(b'\\x01' * 65536, 131072)\n"
        "h.pwrite(b'\\x02' * 65536, 524288)\n"
        "h.flush()\n"
        "h.shutdown()\n",
        srv.uri,
    )
    expected = [
        (0, 131072, 3, "hole,zero"),
        (131072, 65536, 0, "data"),
        (196608, 327680, 3, "hole,zero"),
        (524288, 65536, 0, "data"),
        (589824, 458752, 3, "hole,zero"),
    ]
    out = nbdinfo("--map", srv.uri)
    rows = [line.split(None, 3) for line in out.splitlines()]
    assert [(int(o), int(n), int(t), d) for o, n, t, d in rows] == expected
    # The exact text layout: "%10lu  %10lu  %3u  %s".
    assert out.splitlines()[1] == f"{131072:10d}  {65536:10d}  {0:3d}  data"
    js = json.loads(nbdinfo("--map", "--json", srv.uri))
    assert [(e["offset"], e["length"], e["type"], e["description"]) for e in js] == expected


def test_map_totals(pynbd_server, libnbd) -> None:
    srv = pynbd_server("memory", "1M")
    libnbd("import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
           "h.pwrite(b'x' * 65536, 0)\n", srv.uri)
    out = nbdinfo("--map", "--totals", srv.uri).splitlines()
    assert out[0].split() == ["65536", "6.2%", "0", "data"]
    assert out[1].split() == [str((1 << 20) - 65536), "93.8%", "3", "hole,zero"]


def test_map_after_trim_and_zero(pynbd_server, libnbd) -> None:
    srv = pynbd_server("memory", "1M")
    libnbd(
        "import nbd, sys\n"
        "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "h.pwrite(b'\\xff' * (1 << 20), 0)\n"
        "h.trim(65536, 0)\n"
        "h.zero(65536, 262144)\n",
        srv.uri,
    )
    js = json.loads(nbdinfo("--map", "--json", srv.uri))
    assert js[0] == {"offset": 0, "length": 65536, "type": 3, "description": "hole,zero"}
    assert js[1]["offset"] == 65536 and js[1]["type"] == 0
    zeroed = [e for e in js if e["offset"] == 262144]
    assert zeroed and zeroed[0]["type"] & 2 and zeroed[0]["length"] == 65536


def test_map_pattern_and_null(pynbd_server) -> None:
    js = json.loads(nbdinfo("--map", "--json", pynbd_server("pattern", "1M").uri))
    assert js == [{"offset": 0, "length": 1 << 20, "type": 0, "description": "data"}]
    js = json.loads(nbdinfo("--map", "--json", pynbd_server("null", "1M").uri))
    assert [(e["offset"], e["length"]) for e in js] == [(0, 1 << 20)]
    assert js[0]["type"] & 2  # null reads as zeroes


def test_map_same_as_nbdkit(pynbd_server, nbdkit_server, libnbd) -> None:
    script = (
        "import nbd, sys\n"
        "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "for off in (0, 40960, 1 << 20, 3 << 20):\n"
        "    h.pwrite(b'a' * 8192, off)\n"
        "h.trim(4096, 40960)\n"
    )
    maps = []
    for factory in (pynbd_server, nbdkit_server):
        srv = factory("memory", "4M")
        libnbd(script, srv.uri)
        maps.append(json.loads(nbdinfo("--map", "--json", srv.uri)))
    # Both report the same data ranges at 32 KiB granularity (nbdkit's memory page);
    # compare what is data, allowing pynbd a finer granule.
    def data_bytes(m: list[dict], lo: int, hi: int) -> bool:
        return any(e["type"] == 0 and e["offset"] < hi and lo < e["offset"] + e["length"]
                   for e in m)
    for lo, hi in ((0, 8192), (40960 + 4096, 49152), (1 << 20, (1 << 20) + 8192),
                   (3 << 20, (3 << 20) + 8192)):
        assert data_bytes(maps[0], lo, hi) and data_bytes(maps[1], lo, hi)
    for lo, hi in ((65536, 1 << 20), ((1 << 20) + 65536, 3 << 20)):
        assert not data_bytes(maps[0], lo, hi)


def test_list_file_dir(pynbd_server, tmp_path: Path) -> None:
    d = tmp_path / "exports"
    d.mkdir()
    names = ["alpha.img", "beta", "gamma disk.raw"]
    for i, n in enumerate(names):
        (d / n).write_bytes(bytes([i]) * (4096 * (i + 1)))
    srv = pynbd_server("file", f"dir={d}")
    out = nbdinfo("--list", srv.uri)
    for i, n in enumerate(names):
        assert f'export="{n}":' in out
        assert f"export-size: {4096 * (i + 1)}" in out
    js = json.loads(nbdinfo("--list", "--json", srv.uri))
    got = {e["export-name"]: e["export-size"] for e in js["exports"]}
    assert got == {n: 4096 * (i + 1) for i, n in enumerate(names)}


def test_list_single_export(pynbd_server) -> None:
    js = json.loads(nbdinfo("--list", "--json", pynbd_server("memory", "1M").uri))
    assert [e["export-name"] for e in js["exports"]] == [""]


def test_giant_disk(pynbd_server, libnbd) -> None:
    srv = pynbd_server("memory", f"size={GIANT}")
    assert nbdinfo("--size", srv.uri).strip() == str(GIANT)
    ex = nbdinfo_json(srv.uri)["exports"][0]
    assert ex["export-size"] == GIANT
    out = libnbd(
        "import nbd, sys\n"
        "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "n = h.get_size()\n"
        "assert h.pread(1, 2**63 - 2) == b'\\0'\n"
        "h.pwrite(b'Z', 2**63 - 2)\n"
        "assert h.pread(1, 2**63 - 2) == b'Z'\n"
        "print(n)\n",
        srv.uri,
    ).stdout
    assert out.strip() == str(GIANT)


def test_socket_activation_nbdinfo() -> None:
    out = run_peer("nbdinfo", "--json", "--", "[", *PYNBD_SERVE, "pattern", "1M", "]").stdout
    ex = json.loads(out)["exports"][0]
    assert ex["export-size"] == 1 << 20
    assert "uri" not in ex
    out = run_peer("nbdinfo", "--size", "--", "[", *PYNBD_SERVE, "memory", "1M", "]").stdout
    assert out.strip() == b"1048576"
    out = run_peer("nbdinfo", "--map", "--", "[", *PYNBD_SERVE, "memory", "1M", "]").stdout
    assert out.split() == [b"0", b"1048576", b"3", b"hole,zero"]


def test_nbdinfo_under_run() -> None:
    cp = run_peer("nbdinfo", "--version")  # noqa: F841 - require nbdinfo before running
    import subprocess

    from helpers import peer_env

    cp2 = subprocess.run([*PYNBD_SERVE, "-U", "-", "memory", "1M", "--run",
                          'nbdinfo --size "$uri"'],
                         check=False, capture_output=True, text=True, timeout=60, env=peer_env())
    assert cp2.returncode == 0, cp2.stderr
    assert cp2.stdout.strip() == "1048576"


def test_contexts_listed(pynbd_server, libnbd) -> None:
    srv = pynbd_server("memory", "1M")
    out = libnbd(
        "import nbd, sys\n"
        "h = nbd.NBD(); h.set_opt_mode(True); h.connect_uri(sys.argv[1])\n"
        "got = []\n"
        "h.opt_list_meta_context(lambda name: got.append(name))\n"
        "print(' '.join(got))\n"
        "h.opt_abort()\n",
        srv.uri,
    ).stdout
    assert "base:allocation" in out.split()


def test_run_libnbd_helper_works() -> None:
    # Guard: the helper runs the system interpreter, not ours.
    cp = run_libnbd("import sys, nbd; print(sys.executable)")
    assert cp.stdout.strip() == "/usr/bin/python3"


def test_oldstyle_and_plain_newstyle(pynbd_server) -> None:
    out = nbdinfo("--no-content", pynbd_server("-o", "memory", "1M").uri)
    assert out.splitlines()[0] == "protocol: oldstyle without TLS, using simple packets"
    assert "\texport-size: 1048576 (1M)" in out.splitlines()
    info = nbdinfo_json(pynbd_server("--mask-handshake=0", "memory", "1M").uri)
    assert info["protocol"] == "newstyle"
    assert info["structured"] is False
    assert info["exports"][0]["export-size"] == 1 << 20


def test_tcp(pynbd_server) -> None:
    srv = pynbd_server("memory", "1M", tcp=True)
    assert srv.uri.startswith("nbd://127.0.0.1:")
    ex = nbdinfo_json(srv.uri)["exports"][0]
    assert ex["export-size"] == 1 << 20
    assert ex["uri"].startswith("nbd://127.0.0.1:")


def test_list_many_exports(pynbd_server, tmp_path: Path) -> None:
    """nbdinfo --list asks INFO for every export: the option-round limit scales with them."""
    d = tmp_path / "many"
    d.mkdir()
    for i in range(1, 121):
        (d / f"f{i:03d}").write_bytes(b"")
        os.truncate(d / f"f{i:03d}", i * 512)
    srv = pynbd_server("file", f"dir={d}")
    js = json.loads(nbdinfo("--list", "--json", srv.uri))
    got = {e["export-name"]: e["export-size"] for e in js["exports"]}
    assert got == {f"f{i:03d}": i * 512 for i in range(1, 121)}
    out = run_peer("qemu-nbd", "--list", "-k", srv.sock).stdout.decode()
    assert out.count("export: ") == 120


def test_file_map_same_as_nbdkit(pynbd_server, nbdkit_server, libnbd, tmp_path: Path) -> None:
    """A sparse file, then trim and zero through each server: the same map from both."""
    maps = []
    for name, factory in (("ours", pynbd_server), ("theirs", nbdkit_server)):
        img = tmp_path / f"{name}.img"
        with open(img, "wb") as f:
            f.truncate(4 << 20)
            for off, n in ((655360, 131072), (2621440, 65536), (3 << 20, 262144)):
                f.seek(off)
                f.write(os.urandom(n))
        srv = factory("file", img)
        libnbd(
            "import nbd, sys\n"
            "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
            "h.trim(65536, 655360)\n"
            "h.zero(65536, 3 << 20)\n"
            "h.flush()\n",
            srv.uri,
        )
        m = json.loads(nbdinfo("--map", "--json", srv.uri))
        merged: list[list[int]] = []
        for e in m:  # compare the ZERO bit only (punching holes is the filesystem's choice)
            if merged and merged[-1][2] == e["type"] & 2:
                merged[-1][1] += e["length"]
            else:
                merged.append([e["offset"], e["length"], e["type"] & 2])
        maps.append(merged)
    if maps[0] != maps[1]:
        pytest.fail(f"pynbd map {maps[0]}\nnbdkit map {maps[1]}")


def test_no_meta_contexts(pynbd_server, tmp_path: Path) -> None:
    """--no-mc (nbdkit >= 1.38): structured replies, but no base:allocation."""
    srv = pynbd_server("--no-mc", "memory", "1M")
    info = nbdinfo_json(srv.uri)
    assert info["structured"] is True
    assert not info["exports"][0].get("contexts")
    cp = run_peer("nbdinfo", "--map", srv.uri, check=False)
    assert cp.returncode == 1
    assert b'does not support metadata context "base:allocation"' in cp.stderr
    run_peer("nbdcopy", srv.uri, tmp_path / "copy.img")  # copies as all data
    assert (tmp_path / "copy.img").stat().st_size == 1 << 20
