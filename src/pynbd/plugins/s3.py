"""The S3 plugin: objects in an S3 bucket (Amazon S3, Ceph's radosgw...) as a disk. Its
manual page is :class:`S3Plugin`'s docstring."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import FuaMode, Plugin, ThreadModel, parse_size

__all__ = ["S3Plugin"]

#: Connections kept open to the endpoint (shared by every client's worker threads).
MAX_POOL_CONNECTIONS = 64
#: Keys per DeleteObjects request (S3's limit).
DELETE_BATCH = 1000
#: Locks striped over object numbers, so a partial write's read-modify-write of one object
#: is not interleaved with another's.
LOCK_STRIPES = 64
#: Preferred block size advertised for one object that is not a power of two (or for one
#: object, as nbdkit's S3 plugin advertises).
DEFAULT_PREFERRED = 512 * 1024


def _boto3() -> Any:
    try:
        import boto3  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError("S3: the S3 plugin needs boto3: pip install 'pynbd[s3]'") from None
    return boto3


class S3Plugin(Plugin):
    """NAME
        S3 - pynbd S3 plugin (objects in Amazon S3 or a Ceph radosgw bucket as a disk)

    SYNOPSIS
        pynbd serve S3 [access-key=...] [secret-key=...] [session-token=...]
                       [endpoint-url=...] [size=NN object-size=NN]
                       bucket=BUCKET key=STRING

    DESCRIPTION
        S3 serves data stored in an S3 bucket, through boto3 (Amazon's SDK for Python), with
        nbdkit-S3-plugin(1)'s parameters and object layout:

        Without size=, the object KEY is the disk, read-only.

        With size= and object-size=, the disk is SIZE bytes spread over objects of
        OBJECT-SIZE bytes named KEY/%016x (the object number in 16 hexadecimal digits); the
        disk is writable. Objects that do not exist read as zeroes; trim deletes the objects
        a range covers whole, and zero deletes them too (and writes zeroes into the parts of
        objects it covers partly). A write that covers part of an object reads the object
        and writes it back whole.

        Every write is stored when it is answered, so FUA needs nothing more and flush does
        nothing; every client sees every other's writes (multi-conn). One boto3 client with
        a pool of kept-alive connections serves all clients; requests run in the server's
        worker threads.

        Credentials come from the parameters below or, better, from boto3's usual places
        (~/.aws/credentials, AWS_PROFILE, AWS_* environment variables...).

    PARAMETERS
        access-key=ACCESS_KEY
        secret-key=SECRET_KEY
        session-token=SESSION_TOKEN
            The credentials (visible to other users in ps(1): prefer ~/.aws/credentials).

        endpoint-url=ENDPOINT
            The S3 service, for Ceph's radosgw or another S3-compatible server.

        bucket=BUCKET
            The bucket. Required.

        key=STRING
            The object (without size=) or the prefix of the objects (with size=). Required.

        size=SIZE
        object-size=SIZE
            Given together: the disk's size and the size of each object; SIZE must be a
            multiple of OBJECT-SIZE.

    EXAMPLES
        A read-only disk from one object on a Ceph cluster's radosgw:

            pynbd serve S3 endpoint-url=https://ceph.example.com bucket=images key=disk.img

        A 50G writable disk stored in 1M objects disk/0000000000000000, ...:

            pynbd serve S3 endpoint-url=https://ceph.example.com \\
                bucket=images key=disk size=50G object-size=1M
    """

    name = "S3"
    version = "1.0"
    thread_model = ThreadModel.PARALLEL
    config_help = (
        "access-key=<KEY>        AWS access key.\n"
        "secret-key=<KEY>        AWS secret key.\n"
        "session-token=<TOKEN>   AWS session token.\n"
        "endpoint-url=<URL>      The S3 endpoint (radosgw, ...).\n"
        "bucket=<BUCKET>         (required) The bucket.\n"
        "key=<STRING>            (required) The object, or the objects' prefix.\n"
        "size=<SIZE>             Disk size (with object-size=).\n"
        "object-size=<SIZE>      Size of each object (with size=)."
    )

    def __init__(self) -> None:
        self.access_key: str | None = None
        self.secret_key: str | None = None
        self.session_token: str | None = None
        self.endpoint_url: str | None = None
        self.bucket: str | None = None
        self.key: str | None = None
        self.size: int | None = None
        self.obj_size: int | None = None
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]

    # Configuration ---------------------------------------------------------------------
    def config(self, key: str, value: str) -> None:
        k = key.replace("_", "-")
        if k == "access-key":
            self.access_key = value
        elif k == "secret-key":
            self.secret_key = value
        elif k == "session-token":
            self.session_token = value
        elif k == "endpoint-url":
            self.endpoint_url = value
        elif k == "bucket":
            self.bucket = value
        elif k == "key":
            self.key = value
        elif k == "size":
            self.size = parse_size(value, "size")
        elif k == "object-size":
            self.obj_size = parse_size(value, "object-size")
        else:
            raise ConfigError(f"unknown parameter {key}")

    def config_complete(self) -> None:
        if self.bucket is None:
            raise ConfigError("bucket parameter missing")
        if self.key is None:
            raise ConfigError("key parameter missing")
        if bool(self.size) != bool(self.obj_size):
            raise ConfigError("`size` and `object-size` parameters must always be "
                              "specified together")
        if self.size and self.obj_size and self.size % self.obj_size:
            raise ConfigError("`size` must be a multiple of `object-size`")

    def _new_client(self) -> Any:
        boto3 = _boto3()
        from botocore.config import Config  # type: ignore[import-untyped]

        return boto3.client(
            "s3", aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            aws_session_token=self.session_token, endpoint_url=self.endpoint_url,
            config=Config(max_pool_connections=MAX_POOL_CONNECTIONS))

    def get_ready(self) -> None:
        # Find out now, with the error on the terminal, whether the bucket (and the object)
        # can be reached. The client used for serving is made after the fork.
        self._check(self._new_client())

    def _check(self, client: Any) -> None:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            if self.obj_size:
                client.head_bucket(Bucket=self.bucket)
            else:
                client.head_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            code = _code(e)
            if code in ("404", "NoSuchBucket", "NoSuchKey", "NotFound"):
                what = (f"bucket '{self.bucket}'" if self.obj_size
                        else f"object '{self.key}' in bucket '{self.bucket}'")
                raise ConfigError(f"S3: {what} does not exist") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ConfigError(f"S3: access to bucket '{self.bucket}' denied "
                                  f"(check the credentials)") from None
            raise ConfigError(f"S3: {e}") from None
        except BotoCoreError as e:
            raise ConfigError(f"S3: {e}") from None

    def after_fork(self) -> None:
        self._client = self._new_client()

    def _s3(self) -> Any:
        if self._client is None:  # served without after_fork (a server embedded in a program)
            with self._client_lock:
                if self._client is None:
                    self._client = self._new_client()
        return self._client

    # Connection ------------------------------------------------------------------------
    def open(self, readonly: bool, export_name: str, is_tls: bool) -> bool:
        return readonly

    def get_size(self, h: bool) -> int:
        if self.size:
            return self.size
        resp = self._call("head_object", Bucket=self.bucket, Key=self.key)
        return int(resp["ContentLength"])

    def block_size(self, h: bool) -> tuple[int, int, int]:
        # Any alignment is served (pynbd enforces the minimum, nbdkit 1.32 does not: so
        # the minimum is 1, not the object size as nbdkit-S3-plugin advertises).
        o = self.obj_size or 0
        preferred = o if 512 <= o <= 32 << 20 and o & (o - 1) == 0 else DEFAULT_PREFERRED
        return (1, preferred, 0xFFFFFFFF)

    def can_write(self, h: bool) -> bool:
        return self.obj_size is not None and not h

    def can_flush(self, h: bool) -> bool:
        return True

    def can_trim(self, h: bool) -> bool:
        return self.obj_size is not None

    def can_zero(self, h: bool) -> bool:
        return self.obj_size is not None

    def can_fast_zero(self, h: bool) -> bool:
        return True

    def can_fua(self, h: bool) -> FuaMode:
        return FuaMode.NATIVE

    def can_multi_conn(self, h: bool) -> bool:
        return True

    def is_rotational(self, h: bool) -> bool:
        return False

    # S3 requests -----------------------------------------------------------------------
    def _call(self, op: str, **kw: Any) -> Any:
        """One S3 request; its failure as a CommandError with a one-line message."""
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        try:
            return getattr(self._s3(), op)(**kw)
        except ClientError as e:
            code = _code(e)
            err = errno.ENOENT if code in ("404", "NoSuchKey", "NoSuchBucket") else \
                errno.EPERM if code in ("403", "AccessDenied") else errno.EIO
            raise CommandError(err, f"S3 {op} {kw.get('Key', '')}: {e}") from None
        except BotoCoreError as e:
            raise CommandError(errno.EIO, f"S3 {op} {kw.get('Key', '')}: {e}") from None

    def _object(self, n: int) -> str:
        return f"{self.key}/{n:016x}"

    def _get(self, key: str, offset: int, count: int, missing_ok: bool) -> bytes:
        try:
            resp = self._call("get_object", Bucket=self.bucket, Key=key,
                              Range=f"bytes={offset}-{offset + count - 1}")
        except CommandError as e:
            if missing_ok and e.errno == errno.ENOENT:
                return bytes(count)
            raise
        body = resp["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        if len(data) != count:
            raise CommandError(errno.EIO, f"S3 object {key}: asked for {count} bytes at "
                                          f"{offset}, got {len(data)} (is it "
                                          f"{self.obj_size} bytes long?)")
        return data

    def _put(self, n: int, data: Any) -> None:
        self._call("put_object", Bucket=self.bucket, Key=self._object(n), Body=bytes(data))

    def _pieces(self, count: int, offset: int) -> Iterator[tuple[int, int, int, int]]:
        """(object number, offset in it, length, offset in the request) for a range."""
        o = self.obj_size or 1
        done = 0
        while done < count:
            n, start = divmod(offset + done, o)
            length = min(count - done, o - start)
            yield n, start, length, done
            done += length

    # Data ------------------------------------------------------------------------------
    def pread(self, h: bool, count: int, offset: int, flags: int) -> bytes | bytearray:
        if not self.obj_size:
            return self._get(self.key or "", offset, count, missing_ok=False)
        pieces = list(self._pieces(count, offset))
        if len(pieces) == 1:
            n, start, length, _ = pieces[0]
            return self._get(self._object(n), start, length, missing_ok=True)
        buf = bytearray(count)
        for n, start, length, at in pieces:
            buf[at:at + length] = self._get(self._object(n), start, length, missing_ok=True)
        return buf

    def pwrite(self, h: bool, buf: memoryview, offset: int, flags: int) -> None:
        o = self._need_objects()
        view = memoryview(buf)
        for n, start, length, at in self._pieces(len(view), offset):
            part = view[at:at + length]
            if length == o:
                self._put(n, part)
            else:
                self._patch(n, start, part)

    def _patch(self, n: int, start: int, part: Any) -> None:
        """Read-modify-write of part of object ``n``."""
        o = self._need_objects()
        with self._locks[n % LOCK_STRIPES]:
            whole = bytearray(self._get(self._object(n), 0, o, missing_ok=True))
            whole[start:start + len(part)] = part
            self._put(n, whole)

    def trim(self, h: bool, count: int, offset: int, flags: int) -> None:
        o = self._need_objects()
        first = -(-offset // o)
        last = (offset + count) // o
        self._delete(first, last)

    def zero(self, h: bool, count: int, offset: int, flags: int) -> None:
        o = self._need_objects()
        whole: list[int] = []
        for n, start, length, _ in self._pieces(count, offset):
            if length == o:
                whole.append(n)
            else:
                self._patch(n, start, bytes(length))
        if whole:
            self._delete(whole[0], whole[-1] + 1)

    def flush(self, h: bool, flags: int) -> None:
        pass  # every write is stored before it is answered

    def _need_objects(self) -> int:
        if not self.obj_size:
            raise CommandError(errno.EROFS, "S3: a disk of one object is read-only")
        return self.obj_size

    def _delete(self, first: int, last: int) -> None:
        """Delete the existing objects numbered first (inclusive) to last (exclusive)."""
        if first >= last:
            return
        batch: list[dict[str, str]] = []
        for key in self._existing(first, last):
            batch.append({"Key": key})
            if len(batch) == DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _existing(self, first: int, last: int) -> Iterator[str]:
        """Keys of the objects numbered first to last-1 that exist, listed in order."""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": f"{self.key}/"}
        if first:
            kw["StartAfter"] = self._object(first - 1)
        stop = self._object(last)
        while True:
            resp = self._call("list_objects_v2", **kw)
            for item in resp.get("Contents", ()):
                if item["Key"] >= stop:
                    return
                yield item["Key"]
            if not resp.get("IsTruncated"):
                return
            kw["ContinuationToken"] = resp["NextContinuationToken"]

    def _delete_batch(self, batch: list[dict[str, str]]) -> None:
        resp = self._call("delete_objects", Bucket=self.bucket,
                          Delete={"Objects": batch, "Quiet": True})
        errors = resp.get("Errors")
        if errors:
            first = errors[0]
            raise CommandError(errno.EIO, f"S3: could not delete {len(errors)} objects "
                                          f"({first.get('Key')}: {first.get('Message')})")


def _code(e: Any) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
