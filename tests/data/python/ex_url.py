"""A read-only disk over HTTP, for nbdkit's Python plugin API, written for pynbd's tests.

Exercises: API_VERSION 2; url= checked in config_complete; thread_model (PARALLEL: a
callback waiting for the network lets other requests run); get_size from a HEAD request,
refusing a server without "Accept-Ranges: bytes"; pread as a GET of one byte range
("Range: bytes=FIRST-LAST"), refusing any answer but 206 Partial Content of exactly the
range asked for; can_write false (read-only whatever the client asks); can_multi_conn.
Only the standard library (urllib.request).

    nbdkit python ex_url.py url=http://HOST/DISK.IMG
"""

import errno
import urllib.request

import nbdkit

API_VERSION = 2
TIMEOUT = 30

url = None


def config(key, value):
    global url
    if key != "url":
        raise RuntimeError(f"unknown parameter {key!r} (this disk takes url=URL)")
    url = value


def config_complete():
    if url is None:
        raise RuntimeError("missing url=URL: the object to serve")
    if not url.startswith(("http://", "https://")):
        raise RuntimeError(f"{url}: not an http:// or https:// URL")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return {}


def get_size(h):
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
        ranges = r.headers.get("Accept-Ranges", "none")
        length = r.headers.get("Content-Length")
    if ranges != "bytes":
        raise RuntimeError(f"{url}: the server does not serve byte ranges "
                           f"(Accept-Ranges: {ranges})")
    if length is None:
        raise RuntimeError(f"{url}: no Content-Length in the answer to HEAD")
    return int(length)


def can_write(h):
    return False


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    last = offset + len(buf) - 1
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-{last}"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as r:
        status = r.status
        data = r.read(len(buf) + 1)
    if status != 206 or len(data) != len(buf):
        nbdkit.set_error(errno.EIO)
        raise RuntimeError(f"{url}: asked for bytes {offset}-{last}, got status {status} "
                           f"with {len(data)} bytes")
    buf[:] = data
