"""The S3 plugin against the session cluster's radosgw (conftest.py): round trips through
boto3 and nbdcopy, disks of many objects in nbdkit-S3-plugin's layout (read side by side
with nbdkit's S3 plugin), partial writes, zero and trim, one-line errors."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from helpers import run_peer, run_pynbd

MiB = 1 << 20
_buckets = itertools.count()


def _bucket(ceph) -> str:
    name = f"pynbd-test-{next(_buckets)}"
    ceph.s3().create_bucket(Bucket=name)
    return name


def _objects(s3, bucket: str) -> dict[str, bytes]:
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_one_object_read_only(ceph, pynbd_server, libnbd, tmp_path: Path) -> None:
    bucket = _bucket(ceph)
    data = random.Random(1).randbytes(3 * MiB + 17)
    ceph.s3().put_object(Bucket=bucket, Key="disk.img", Body=data)
    srv = pynbd_server("S3", *ceph.s3_args(), f"bucket={bucket}", "key=disk.img")
    out = tmp_path / "out"
    run_peer("nbdcopy", srv.uri, out)
    assert out.read_bytes() == data
    got = libnbd("import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
                 "print(h.get_size(), h.is_read_only())\n"
                 "try:\n    h.pwrite(b'x', 0)\nexcept nbd.Error as e:\n    print(e.errno)\n",
                 srv.uri).stdout.split()
    assert got == [str(len(data)), "True", "EPERM"]


def test_many_objects_round_trip_and_layout(ceph, pynbd_server, nbdkit_server,
                                            tmp_path: Path) -> None:
    bucket = _bucket(ceph)
    data = random.Random(2).randbytes(8 * MiB)
    src = tmp_path / "src"
    src.write_bytes(data)
    # nbdkit 1.32 refuses its S3 plugin's minimum block size (the object size) above 64K.
    o = 64 * 1024
    args = [*ceph.s3_args(), f"bucket={bucket}", "key=vm/disk", "size=8M", "object-size=64k"]
    srv = pynbd_server("S3", *args)
    run_peer("nbdcopy", src, srv.uri)
    objects = _objects(ceph.s3(), bucket)
    # nbdkit-S3-plugin's layout: KEY/%016x, object-size bytes each.
    assert objects == {f"vm/disk/{n:016x}": data[n * o:(n + 1) * o] for n in range(128)}
    back = tmp_path / "back"
    run_peer("nbdcopy", srv.uri, back)
    assert back.read_bytes() == data
    # nbdkit's S3 plugin reads the same disk.
    kit = nbdkit_server("S3", *args)
    kit_out = tmp_path / "kit"
    run_peer("nbdcopy", kit.uri, kit_out)
    assert kit_out.read_bytes() == data


def test_partial_writes_zero_and_trim(ceph, pynbd_server, libnbd) -> None:
    bucket = _bucket(ceph)
    srv = pynbd_server("S3", *ceph.s3_args(), f"bucket={bucket}", "key=d", "size=4M",
                       "object-size=256k")
    libnbd(
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "assert h.get_size() == 4 << 20 and h.can_multi_conn() and h.can_fua()\n"
        "assert h.pread(4096, 1 << 20) == bytes(4096)\n"            # no object yet: zeroes
        "h.pwrite(b'\\x11' * (4 << 20), 0)\n"
        "h.pwrite(b'\\x22' * 1000, 262144 - 500, nbd.CMD_FLAG_FUA)\n"  # across two objects
        "h.zero(600000, 500000)\n"                       # parts of 1 and 4, whole 2 and 3
        "h.trim(262144 * 2, 262144 * 12)\n"                         # objects 12 and 13
        "h.trim(1000, 262144 * 15 + 5)\n"                           # part of one: nothing
        "h.flush()\n"
        "exp = bytearray(b'\\x11' * (4 << 20))\n"
        "exp[262144 - 500:262144 + 500] = b'\\x22' * 1000\n"
        "exp[500000:1100000] = bytes(600000)\n"
        "exp[262144 * 12:262144 * 14] = bytes(262144 * 2)\n"
        "g = nbd.NBD(); g.connect_uri(sys.argv[1])\n"
        "assert g.pread(4 << 20, 0) == exp\n", srv.uri)
    keys = {o["Key"] for o in ceph.s3().list_objects_v2(Bucket=bucket)["Contents"]}
    # zero deleted objects 2 and 3 (covered whole), trim 12 and 13
    assert keys == {f"d/{n:016x}" for n in range(16) if n not in (2, 3, 12, 13)}


@pytest.mark.parametrize(("args", "message"), [
    (["bucket=nosuchbucket", "key=k", "size=1M", "object-size=64k"],
     "S3: bucket 'nosuchbucket' does not exist"),
    (["key=k"], "bucket parameter missing"),
    (["bucket=b"], "key parameter missing"),
    (["bucket=b", "key=k", "size=1M"],
     "`size` and `object-size` parameters must always be specified together"),
    (["bucket=b", "key=k", "size=1M", "object-size=300k"],
     "`size` must be a multiple of `object-size`"),
    (["bucket=b", "key=k", "colour=blue"], "unknown parameter colour"),
])
def test_bad_parameters(ceph, args: list[str], message: str) -> None:
    cp = run_pynbd("serve", "S3", *ceph.s3_args(), *args, check=False, timeout=60)
    err = cp.stderr.decode()
    assert cp.returncode == 1
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_missing_object_and_refused_credentials(ceph) -> None:
    bucket = _bucket(ceph)
    ceph.s3().put_object(Bucket=bucket, Key="there", Body=b"x" * 512)
    cp = run_pynbd("serve", "S3", *ceph.s3_args(), f"bucket={bucket}", "key=absent",
                   check=False, timeout=60)
    assert cp.returncode == 1
    assert cp.stderr.decode().strip() == (f"pynbd serve: error: S3: object 'absent' in bucket "
                                          f"'{bucket}' does not exist")
    cp = run_pynbd("serve", "S3", f"endpoint-url={ceph.s3_endpoint}",
                   f"access-key={ceph.s3_access_key}", "secret-key=wrong", f"bucket={bucket}",
                   "key=there", check=False, timeout=60)
    assert cp.returncode == 1
    assert cp.stderr.decode().strip() == (f"pynbd serve: error: S3: access to bucket "
                                          f"'{bucket}' denied (check the credentials)")
