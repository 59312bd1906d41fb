"""Bad parameters of the log, delay, error, stats, pause, checkwrite and rate filters: the
same command line under nbdkit 1.32 and pynbd exits 1 with the same message (pynbd: one
line, no traceback); values nbdkit accepts, pynbd accepts too.

Run as ``FILTER null PARAMS --run true`` in one directory, so relative paths agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_peer, run_pynbd

LONG = "/tmp/" + "a" * 120  # longer than a Unix socket path can be

BAD = [
    ("delay", ["rdelay=abc"]),
    ("delay", ["rdelay=xms"]),
    ("delay", ["rdelay=5000000"]),
    ("delay", ["rdelay=-1"]),
    ("delay", ["rdelay=1.5"]),
    ("delay", ["rdelay="]),
    ("delay", ["wdelay= 3 "]),
    ("delay", ["delay-open=99999999999999999999"]),
    ("delay", ["delay-close=0x10x"]),
    ("delay", ["delay-fast-zero=maybe"]),
    ("error", ["error=EFOO"]),
    ("error", ["error-pread=eio"]),
    ("error", ["error-rate=2"]),
    ("error", ["error-rate=50%x"]),
    ("error", ["error-zero-rate=abc"]),
    ("error", ["error-rate=-1%"]),
    ("error", ["error-rate="]),
    ("error", ["error-cache-rate=inf"]),
    ("error", ["error-rate=5%%"]),
    ("log", ["logappend=maybe"]),
    ("log", ["logfile=/nonexistent/dir/x"]),
    ("log", ["logfile="]),
    ("stats", []),
    ("stats", ["statsfile=s.txt", "statsthreshold=101"]),
    ("stats", ["statsfile=s.txt", "statsthreshold=-1"]),
    ("stats", ["statsfile=s.txt", "statsthreshold=x"]),
    ("stats", ["statsfile=s.txt", "statsthreshold=50.5"]),
    ("stats", ["statsfile=s.txt", "statsappend=maybe"]),
    ("stats", ["statsfile="]),
    ("stats", ["statsfile=/nonexistent/dir/x"]),
    ("pause", []),
    ("pause", ["pause-control=/nonexistent/dir/x"]),
    ("pause", [f"pause-control={LONG}"]),
    ("pause", ["pause-control="]),
    ("rate", ["rate=0"]),
    ("rate", ["rate=x"]),
    ("rate", ["rate=-1"]),
    ("rate", ["connection-rate=1.5M"]),
    ("rate", ["connection-rate=0"]),
    ("rate", ["rate=1M", "rate=2M"]),
    ("rate", ["connection-rate=1K", "connection-rate=2K"]),
    ("rate", ["burstiness=x"]),
    ("rate", ["rate-file="]),
    ("rate", ["connection-rate-file="]),
]

GOOD = [
    ("delay", ["rdelay=0x10ms", "wdelay=010", "delay-open= 5ms", "delay-fast-zero=OFF"]),
    ("delay", ["delay-reads=1", "delay-writes=1", "delay-zeroes=1", "delay-trims=1",
               "delay-discard=1", "delay-discards=1", "delay-extent=1", "delay-cache=1",
               "delay-close=0"]),
    ("error", ["error=ESHUTDOWN", "error-rate= 5%", "error-trim-rate=1e-1",
               "error-extents=ENOSPC", "error-pwrite-file=trigger", "error-rate=0x1p-1"]),
    ("log", ["logfile=l.txt", "logappend=yes"]),
    ("stats", ["statsfile=s.txt", "statsthreshold=0x20", "statsappend=1"]),
    ("rate", ["rate=1M", "connection-rate=100K", "burstiness=1.5x", "rate-file=r"]),
]


def _messages(stderr: bytes) -> list[str]:
    """The error messages, without the program's prefix ("nbdkit: error: ")."""
    out = []
    for line in stderr.decode(errors="replace").splitlines():
        _, sep, msg = line.partition("error: ")
        if sep:
            out.append(msg)
    return out


@pytest.mark.parametrize(("flt", "params"), BAD, ids=lambda v: " ".join(v) if
                         isinstance(v, list) else v)
def test_bad_parameter_gives_nbdkits_message(flt: str, params: list[str],
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["-U", "-", f"--filter={flt}", "null", *params, "--run", "true"]
    want = run_peer("nbdkit", *argv, check=False)
    got = run_pynbd("serve", *argv, check=False)
    assert want.returncode == 1, want.stderr
    assert got.returncode == 1, got.stderr
    assert b"Traceback" not in got.stderr
    assert len(got.stderr.splitlines()) == 1, got.stderr
    assert _messages(got.stderr) == _messages(want.stderr)


@pytest.mark.parametrize(("flt", "params"), GOOD, ids=lambda v: " ".join(v) if
                         isinstance(v, list) else v)
def test_accepted_values_are_accepted(flt: str, params: list[str], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["-U", "-", f"--filter={flt}", "null", *params, "--run", "true"]
    want = run_peer("nbdkit", *argv, check=False)
    got = run_pynbd("serve", *argv, check=False)
    assert want.returncode == 0, want.stderr
    assert got.returncode == 0, got.stderr
    assert got.stderr == b""


def test_unknown_parameter_reaches_the_plugin(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """nbdkit 1.32 has no zdelay (nor fdelay, edelay...): it is the plugin's to refuse."""
    monkeypatch.chdir(tmp_path)
    for flt, key in (("delay", "zdelay=1"), ("delay", "delay-flush=1"),
                     ("error", "error-flush=EIO"), ("checkwrite", "check=1")):
        argv = ["-U", "-", f"--filter={flt}", "null", key, "--run", "true"]
        assert run_peer("nbdkit", *argv, check=False).returncode == 1
        got = run_pynbd("serve", *argv, check=False)
        assert got.returncode == 1 and len(got.stderr.splitlines()) == 1, got.stderr
