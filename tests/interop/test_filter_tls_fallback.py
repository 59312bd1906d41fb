"""The tls-fallback filter and what plugins see of TLS (nbdkit.is_tls()), side by side
with nbdkit 1.32 under --tls=on."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Server
from helpers import run_peer as _run_peer
from tls_certs import make_x509


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_x509(tmp_path_factory.mktemp("tlsfb") / "x509")


def peer(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cp = _run_peer(tool, *args, check=check)
    return subprocess.CompletedProcess(cp.args, cp.returncode, cp.stdout.decode(),
                                       cp.stderr.decode())


def plain(srv: Server, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={srv.sock}"


def tls(srv: Server, certs: Path) -> str:
    return f"nbds+unix:///?socket={srv.sock}&tls-certificates={certs}"


def view(srv: Server, certs: Path) -> dict[str, str]:
    """What a plain client and a TLS client see (nbdinfo; block sizes left out: pynbd
    always advertises them)."""
    def json(*args: str) -> str:
        out = peer("nbdinfo", "--json", *args, plain(srv)).stdout.replace(srv.sock or "", "S")
        return "\n".join(x for x in out.splitlines() if "block_size" not in x)

    return {
        "info": json(),
        "list": json("--list"),
        "data": peer("nbdcopy", plain(srv, "anything"), "-").stdout,
        "tls_size": peer("nbdinfo", "--size", tls(srv, certs)).stdout,
    }


@pytest.mark.parametrize("extra", [[], ["tlsreadme=hello"], ["tlsreadme=" + "x" * 600]])
def test_same_as_nbdkit(pynbd_server: Callable[..., Server],
                        nbdkit_server: Callable[..., Server], certs: Path,
                        extra: list[str]) -> None:
    args = ["--tls=on", f"--tls-certificates={certs}", "--filter=tls-fallback",
            "memory", "1M", *extra]
    got, want = (view(start(*args), certs) for start in (pynbd_server, nbdkit_server))
    assert got == want
    assert got["tls_size"] == "1048576\n"
    assert len(got["data"]) == 512


def test_plugin_not_opened_without_tls(pynbd_server: Callable[..., Server],
                                       nbdkit_server: Callable[..., Server],
                                       certs: Path) -> None:
    """The plugin's open fails: clients without TLS still read the message; with TLS the
    failure is the client's."""
    args = ["--tls=on", f"--tls-certificates={certs}", "--filter=tls-fallback", "eval",
            "open=echo nope >&2; exit 1", "get_size=echo 1M", "pread=exit 1"]
    for start in (pynbd_server, nbdkit_server):
        srv = start(*args)
        assert peer("nbdinfo", "--size", plain(srv)).stdout == "512\n"
        assert peer("nbdinfo", "--size", tls(srv, certs), check=False).returncode != 0


_IS_TLS = '''
import nbdkit

API_VERSION = 2

def config(key, value):
    pass

def open(readonly):
    return {"tls": nbdkit.is_tls()}

def get_size(h):
    return 2 * 1048576 if h["tls"] else 1048576

def pread(h, buf, offset, flags):
    buf[:] = bytes(len(buf))
'''


def test_python_plugin_sees_is_tls(pynbd_server: Callable[..., Server], certs: Path,
                                   tmp_path: Path) -> None:
    """nbdkit.is_tls() (nbdkit 1.32's python plugin lacks it: pynbd only)."""
    script = tmp_path / "istls.py"
    script.write_text(_IS_TLS)
    srv = pynbd_server("--tls=on", f"--tls-certificates={certs}", "python", str(script))
    assert peer("nbdinfo", "--size", plain(srv)).stdout == "1048576\n"
    assert peer("nbdinfo", "--size", tls(srv, certs)).stdout == "2097152\n"


def test_sh_plugin_open_gets_tls(pynbd_server: Callable[..., Server],
                                 nbdkit_server: Callable[..., Server], certs: Path) -> None:
    """open's third argument ($4) says whether the client negotiated TLS."""
    args = ["--tls=on", f"--tls-certificates={certs}", "eval", "open=echo $4",
            'get_size=if [ "$2" = true ]; then echo 2M; else echo 1M; fi',
            "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none"]
    for start in (pynbd_server, nbdkit_server):
        srv = start(*args)
        assert peer("nbdinfo", "--size", plain(srv)).stdout == "1048576\n"
        assert peer("nbdinfo", "--size", tls(srv, certs)).stdout == "2097152\n"
