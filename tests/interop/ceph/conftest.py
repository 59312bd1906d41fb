"""A one-node Ceph cluster shared by every test of the session (scripts/ceph-cluster).

    def test_x(ceph, pynbd_server):
        image = ceph.new_image(64 << 20)             # a fresh RBD image in pool rbd
        srv = pynbd_server("rbd", f"conf={ceph.conf}", image)
        ceph.rbd("export", image, out)               # the rbd command on this cluster
        s3 = ceph.s3()                               # a boto3 client for its radosgw

The cluster starts once, on first use (about 6 s), and stops at the end of the session. A
missing Ceph package skips (and fails under CI=true, where .ci/run installs them).
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import missing, short_tmpdir

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "ceph-cluster"
#: The Debian packages that provide each daemon or tool the cluster needs.
CEPH_TOOLS = {"ceph-mon": "ceph-mon", "ceph-mgr": "ceph-mgr", "ceph-osd": "ceph-osd",
              "radosgw": "radosgw", "radosgw-admin": "radosgw", "rbd": "ceph-common",
              "ceph": "ceph-common", "ceph-authtool": "ceph-common",
              "monmaptool": "ceph-base"}
#: Starting takes about 6 s here; a loaded machine gets a generous margin.
START_TIMEOUT = 240


@dataclass
class Ceph:
    dir: Path
    conf: str
    keyring: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    _names: Iterator[int] = field(default_factory=itertools.count)

    def run(self, tool: str, *args: str, timeout: float = 120, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        cp = subprocess.run([tool, "-c", self.conf, *args], capture_output=True,
                            timeout=timeout, check=False, input=input,
                            stdin=None if input is not None else subprocess.DEVNULL)
        if check and cp.returncode != 0:
            pytest.fail(f"{tool} {' '.join(args)} failed ({cp.returncode}): "
                        f"{cp.stderr.decode(errors='replace').strip()}", pytrace=False)
        return cp

    def rbd(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return self.run("rbd", *args, **kw)

    def new_image(self, size: int, name: str | None = None) -> str:
        """A new, empty image ``rbd/NAME`` of ``size`` bytes; returns ``rbd/NAME``."""
        spec = f"rbd/{name or f't{next(self._names)}'}"
        self.rbd("create", "--size", f"{size}B", spec)
        return spec

    def export(self, spec: str, out: Path) -> bytes:
        """The image's contents as ``rbd export`` writes them."""
        self.rbd("export", "--no-progress", spec, str(out))
        return out.read_bytes()

    def cluster(self, *args: str) -> None:
        """scripts/ceph-cluster ARGS DIR (stop-osd, start-osd)."""
        cp = subprocess.run([sys.executable, str(SCRIPT), *args, str(self.dir)],
                            capture_output=True, text=True, timeout=START_TIMEOUT,
                            check=False, stdin=subprocess.DEVNULL)
        if cp.returncode != 0:
            pytest.fail(f"ceph-cluster {' '.join(args)}: {cp.stderr.strip()}", pytrace=False)

    def s3(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint,
                            aws_access_key_id=self.s3_access_key,
                            aws_secret_access_key=self.s3_secret_key)

    def s3_args(self) -> list[str]:
        return [f"endpoint-url={self.s3_endpoint}", f"access-key={self.s3_access_key}",
                f"secret-key={self.s3_secret_key}"]


@pytest.fixture(scope="session")
def _ceph_cluster() -> Iterator[Ceph]:
    for tool, pkg in CEPH_TOOLS.items():
        if shutil.which(tool) is None:
            missing(f"{tool} not found on PATH (Debian package {pkg})")
    d = short_tmpdir("pynbd-ceph-")
    d.rmdir()  # the script makes it
    try:
        cp = subprocess.run([sys.executable, str(SCRIPT), "start", str(d)],
                            capture_output=True, text=True, timeout=START_TIMEOUT,
                            check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        subprocess.run([sys.executable, str(SCRIPT), "stop", str(d)], check=False,
                       capture_output=True, timeout=120)
        pytest.fail(f"the Ceph cluster did not start in {START_TIMEOUT} s", pytrace=False)
    if cp.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        pytest.fail(f"the Ceph cluster did not start: {cp.stderr.strip()}", pytrace=False)
    info = json.loads(cp.stdout)
    s3 = info["s3"]
    try:
        yield Ceph(d, info["conf"], info["keyring"], s3["endpoint"], s3["access_key"],
                   s3["secret_key"])
    finally:
        subprocess.run([sys.executable, str(SCRIPT), "stop", str(d)], check=False,
                       capture_output=True, timeout=120)


@pytest.fixture
def ceph(_ceph_cluster: Ceph) -> Ceph:
    """The session's cluster (see the module docstring)."""
    return _ceph_cluster
