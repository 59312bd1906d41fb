"""The luks filter in one process and as a command: the passphrase from a file, a file
descriptor or passphrase-file=, a wrong one refused, whole-sector requests reaching the
plugin as one request each, and the one-line message when cryptography is missing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pynbd.errors import CommandError
from pynbd.filters.luks import LuksFilter
from tests.e2e.shape_chain import Disk, manual_of, open_chain
from tests.helpers import PYNBD, ROOT, require

SECRET = "open sesame"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("luks")
    path, key = d / "disk.img", d / "key"
    key.write_text(SECRET)
    with open(path, "wb") as f:
        f.truncate(3 << 20)
    subprocess.run([require("cryptsetup"), "luksFormat", "-q", "--type", "luks1",
                    "--pbkdf-force-iterations", "1000", "--key-file", key, path],
                   check=True, capture_output=True)
    return path.read_bytes()


def test_passphrase_forms(image: bytes, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(SECRET + "\n")  # a final newline is not part of it
    r, w = os.pipe()
    os.write(w, SECRET.encode())
    os.close(w)
    for param in (f"passphrase=+{key}", f"passphrase-file={key}", f"passphrase=-{r}",
                  f"passphrase={SECRET}"):
        _, ctx = open_chain(Disk(image), (LuksFilter, [param]))
        assert ctx.get_size() == (3 << 20) - 4096 * 512
        ctx.close()
    with pytest.raises(CommandError) as e:
        open_chain(Disk(image), (LuksFilter, ["passphrase=nope"]))
    assert e.value.message == "LUKS passphrase is not correct, no key slot could be unlocked"


def test_whole_sectors_in_one_request(image: bytes) -> None:
    disk = Disk(image)
    _, ctx = open_chain(disk, (LuksFilter, [f"passphrase={SECRET}"]))
    before = len(disk.calls)
    ctx.pwrite(b"\xaa" * 65536, 4096)
    ctx.zero(8192, 1 << 20)
    assert bytes(ctx.pread(65536, 4096)) == b"\xaa" * 65536
    assert bytes(ctx.pread(8192, 1 << 20)) == bytes(8192)
    payload = 4096 * 512
    assert [c for c in disk.calls[before:] if c[0] in ("pread", "pwrite")] == [
        ("pwrite", 65536, payload + 4096, 0), ("pwrite", 8192, payload + (1 << 20), 0),
        ("pread", 65536, payload + 4096, 0), ("pread", 8192, payload + (1 << 20), 0)]
    assert bytes(disk.data[payload + 4096:payload + 4112]) != b"\xaa" * 16  # encrypted


def test_without_cryptography(tmp_path: Path) -> None:
    """Without the cryptography package the server exits 1 with one line saying how to
    install it (an import of it is made to fail)."""
    fake = tmp_path / "cryptography"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join((str(tmp_path), str(ROOT / "src")))
    cp = subprocess.run([*PYNBD, "serve", "-U", "-", "--filter=luks", "null",
                         "passphrase=x", "--run", "true"], capture_output=True, text=True,
                        env=env, timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert cp.returncode == 1
    assert cp.stderr.strip().splitlines() == [(
        "pynbd serve: error: luks: this filter needs the Python package 'cryptography' "
        "(pip install 'pynbd[luks]')")]


def test_manual() -> None:
    text = manual_of("luks")
    assert "passphrase=+FILENAME" in text and "passphrase-file=FILENAME" in text
