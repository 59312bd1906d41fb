"""The ssh plugin's connection options that are about speed: large SSH packets and
window, AES-GCM first, and an ssh configuration's own Ciphers line respected."""

from __future__ import annotations

import pytest

pytest.importorskip("asyncssh")

from pynbd.plugins.ssh import PREFERRED_CIPHERS, SSH_MAX_PACKET, SshPlugin


def options(tmp_path, config_text: str | None) -> dict:
    p = SshPlugin()
    p.config("host", "127.0.0.1")
    p.config("path", "/disk.img")
    if config_text is None:
        p.config("config", "")
    else:
        cfg = tmp_path / "ssh_config"
        cfg.write_text(config_text)
        p.config("config", str(cfg))
    p.config_complete()
    return p._options()


def test_large_packets_and_aes_gcm_first(tmp_path):
    kw = options(tmp_path, None)
    assert kw["max_pktsize"] == SSH_MAX_PACKET and kw["window"] >= 4 * SSH_MAX_PACKET
    algs = kw["encryption_algs"]
    assert tuple(algs[:2]) == PREFERRED_CIPHERS
    assert "chacha20-poly1305@openssh.com" in algs  # still offered, after them


def test_a_configured_cipher_list_is_kept(tmp_path):
    kw = options(tmp_path, "Host *\n  Ciphers chacha20-poly1305@openssh.com\n")
    assert "encryption_algs" not in kw
    kw = options(tmp_path, "Host *\n  Compression no\n")
    assert "encryption_algs" in kw
