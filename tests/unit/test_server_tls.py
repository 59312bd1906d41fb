"""The server's TLS configuration: --tls* parsing, the SSL context, the psktool file and the
URIs --run and --print-uri give (no network)."""

from __future__ import annotations

import ssl
import sys
from pathlib import Path

import pytest

from pynbd.errors import ConfigError
from pynbd.server.listeners import make_uri
from pynbd.server.options import UsageError, parse_args
from pynbd.server.tls import certificate_dirs, make_context, read_psk


@pytest.mark.parametrize("value, mode", [
    ("require", "require"), ("required", "require"), ("force", "require"), ("on", "on"),
    ("yes", "on"), ("1", "on"), ("off", "off"), ("no", "off"), ("0", "off"),
    ("REQUIRE", "require"),
])
def test_tls_modes(value: str, mode: str) -> None:
    assert parse_args([f"--tls={value}", "memory", "1M"]).tls == mode


def test_tls_options() -> None:
    o = parse_args(["--tls=on", "--tls-certificates=rel/dir", "--tls-verify-peer",
                    "--tls-psk=keys.psk", "memory", "1M"])
    assert o.tls_certificates is not None and o.tls_certificates.endswith("/rel/dir")
    assert Path(o.tls_certificates).is_absolute()
    assert o.tls_verify_peer and o.tls_psk == "keys.psk"


@pytest.mark.parametrize("argv, message", [
    (["--tls=maybe"], "could not decipher boolean (maybe)"),
    (["--tls=require", "-o"], "cannot use oldstyle protocol (-o) and require TLS"),
])
def test_bad_lines(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_args([*argv, "memory", "1M"])


def test_oldstyle_with_tls_on_is_allowed() -> None:
    assert parse_args(["--tls=on", "-o", "memory", "1M"]).oldstyle


def test_default_directories(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/u")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert certificate_dirs(None) == [Path("/home/u/.pki/nbdkit"), Path("/etc/pki/nbdkit")]
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert certificate_dirs(None) == [Path("/etc/pki/nbdkit")]
    assert certificate_dirs("/x") == [Path("/x")]


def test_off_has_no_context() -> None:
    assert make_context("off", "/nonexistent", True, None) is None


def test_missing_certificates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError) as e:
        make_context("require", str(tmp_path), False, None)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    assert make_context("on", str(tmp_path), False, None) is None
    assert "TLS is disabled" in caplog.text


def test_context_from_directory(tmp_path: Path) -> None:
    from tls_certs import make_x509

    d = make_x509(tmp_path / "x509")
    ctx = make_context("require", str(d), False, None)
    assert ctx is not None and ctx.verify_mode == ssl.CERT_NONE
    ctx = make_context("require", str(d), True, None)
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED


def test_psk_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "keys.psk"
    f.write_text("alice:00ff10\n\nbob:zz\ncarol:0a\n")
    assert read_psk(str(f), "alice") == b"\x00\xff\x10"
    assert read_psk(str(f), "carol") == b"\x0a"
    assert read_psk(str(f), "dave") is None
    assert "unknown PSK username 'dave'" in caplog.text
    assert read_psk(str(f), "bob") is None
    assert "not hexadecimal" in caplog.text


def test_psk_needs_python_313_or_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file or directory"):
        make_context("require", None, False, str(tmp_path / "none.psk"))
    f = tmp_path / "keys.psk"
    f.write_text("alice:00\n")
    if sys.version_info < (3, 13):
        with pytest.raises(ConfigError, match="Python 3.13"):
            make_context("require", None, False, str(f))
    else:
        assert make_context("require", None, False, str(f)) is not None


@pytest.mark.parametrize("argv, where, uri", [
    (["--tls=require"], {"unix_path": "/s"}, "nbds+unix:///?socket=/s"),
    (["--tls=on"], {"unix_path": "/s"}, "nbd+unix:///?socket=/s"),
    (["--tls=require", "-e", "x"], {"port": 10809}, "nbds://localhost:10809/x"),
    (["--tls=require"], {"vsock_port": 10809}, "nbds+vsock://1:10809"),
])
def test_uris(argv: list[str], where: dict[str, object], uri: str) -> None:
    o = parse_args([*argv, "memory", "1M"])
    kw = {"unix_path": None, "port": None, "vsock_port": None, **where}
    assert make_uri(o, **kw) == uri  # type: ignore[arg-type]
