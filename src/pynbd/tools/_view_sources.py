"""Where ``pynbd view`` gets its messages (private): live view sockets, recordings, and
nbdkit's log filter files.

A recording (``--record FILE``) is newline-delimited JSON: a first line
``{"type":"record","version":1,"sources":[NAME,...]}``, then every message of the
filter's stream as received, with ``"src":N`` added (the index of its source).
"""

from __future__ import annotations

import asyncio
import calendar
import errno
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import IO, Any

from pynbd.tools._view_batch import ns_to_us
from pynbd.tools._view_model import as_json

__all__ = ["RecordWriter", "follow", "is_address", "read_replay"]

#: Longest line accepted from a view socket (a state message of a very fragmented disk).
MAX_LINE = 256 << 20
#: Seconds a view socket has to say hello (the filter does at once).
HELLO_TIMEOUT = 5.0


class ViewError(Exception):
    """A problem to report in one line (no traceback)."""


def is_address(target: str) -> bool:
    """``HOST:PORT`` rather than a socket path."""
    host, sep, port = target.rpartition(":")
    return bool(sep and host and port.isdigit()) and not os.path.exists(target)


async def follow(target: str, src: int, deliver: Callable[[int, dict[str, Any]], None],
                 connected: Callable[[int], None]) -> None:
    """Read the view stream at ``target`` (a socket path or HOST:PORT) until it ends,
    handing each message to ``deliver``."""
    try:
        if is_address(target):
            host, _, port = target.rpartition(":")
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port),
                                                           limit=MAX_LINE)
        else:
            reader, writer = await asyncio.open_unix_connection(target, limit=MAX_LINE)
    except OSError as e:
        raise ViewError(f"{target}: {e.strerror or e}") from None
    try:
        first = True
        while True:
            try:
                if first:  # a socket that is not a view filter's may say nothing at all
                    line = await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT)
                else:
                    line = await reader.readline()
            except TimeoutError:
                raise ViewError(f"{target}: not a view socket (no hello within "
                                f"{HELLO_TIMEOUT:g} s)") from None
            except (ValueError, asyncio.LimitOverrunError):
                raise ViewError(f"{target}: a line longer than {MAX_LINE} bytes") from None
            except OSError:
                break
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                raise ViewError(f"{target}: not a view socket (this is not JSON: "
                                f"{line[:40]!r})") from None
            if not isinstance(msg, dict):
                continue
            if first:
                if msg.get("type") != "hello":
                    raise ViewError(f"{target}: not a view socket (no hello message)")
                first = False
                if msg.get("ns") is True:  # records as the filter packs them, please
                    writer.write(_NS_REQUEST)
                elif msg.get("binary") is True:  # records without base64, please
                    writer.write(_BINARY_REQUEST)
                connected(src)
            elif "size" in msg and msg.get("type") == "events":
                try:
                    msg["raw"] = await _binary_records(target, reader, msg["size"])
                except (asyncio.IncompleteReadError, OSError):
                    break
                if msg.get("time") == "ns":  # kept (and recorded) as the usual records, µs
                    msg["raw"] = ns_to_us(msg.pop("raw"))
                    del msg["time"]
            deliver(src, msg)
    finally:
        writer.close()


#: What a viewer sends for binary records (pynbd.filters._view_publish.BINARY_REQUEST),
#: and for binary records in nanoseconds (NS_REQUEST).
_BINARY_REQUEST = b'{"type":"format","events":"binary"}\n'
_NS_REQUEST = b'{"type":"format","events":"binary","time":"ns"}\n'


async def _binary_records(target: str, reader: asyncio.StreamReader, size: Any) -> bytes:
    """The records that follow a binary ``events`` line."""
    if not isinstance(size, int) or not 0 <= size <= MAX_LINE:
        raise ViewError(f"{target}: an events message of {size!r} bytes")
    return await reader.readexactly(size)


class RecordWriter:
    """``--record FILE``: every message, as it arrives."""

    def __init__(self, path: str, names: list[str]) -> None:
        try:
            self.file: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise ViewError(f"--record: {path}: {e.strerror}") from None
        self.write_header(names)

    def write_header(self, names: list[str]) -> None:
        self.file.write(json.dumps({"type": "record", "version": 1, "sources": names}) + "\n")

    def write(self, src: int, msg: dict[str, Any]) -> None:
        """One message, flushed: the file is whole up to the last batch (20 a second),
        whenever it is read or the viewer stops."""
        self.file.write(json.dumps({**as_json(msg), "src": src}, separators=(",", ":")) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_replay(path: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """The sources and messages of a recording or of an nbdkit log filter file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise ViewError(f"--replay: {path}: {e.strerror}") from None
    lines = text.splitlines()
    first = lines[0] if lines else ""
    if first.startswith("{"):
        return _read_record(path, lines)
    if _LOG_LINE.match(first):
        return [os.path.basename(path)], [(0, m) for m in parse_nbdkit_log(lines)]
    raise ViewError(f"--replay: {path}: neither a pynbd view recording nor an nbdkit log "
                    "filter file")


def _read_record(path: str, lines: list[str]) -> tuple[list[str], list[tuple[int, Any]]]:
    try:
        head = json.loads(lines[0])
    except ValueError:
        raise ViewError(f"--replay: {path}:1: not JSON") from None
    if not isinstance(head, dict) or head.get("type") != "record":
        raise ViewError(f"--replay: {path}: not a pynbd view recording (no record header)")
    names = [str(n) for n in head.get("sources", [])] or ["export"]
    out = []
    for no, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            src = int(msg.pop("src", 0))
        except (ValueError, TypeError, AttributeError):
            raise ViewError(f"--replay: {path}:{no}: not a recorded message") from None
        if not 0 <= src < len(names):
            raise ViewError(f"--replay: {path}:{no}: source {src} is not in the header")
        out.append((src, msg))
    return names, out


# ---- nbdkit's log filter format ---------------------------------------------------------

_LOG_LINE = re.compile(
    r"(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) (?:connection=(\d+) )?(\.\.\.)?"
    r"(\w+)(?: id=(\d+))?(.*)$")
_FIELD = re.compile(r"(\w+)=(\S+)")
_KIND = {"Read": "R", "Write": "W", "Trim": "T", "Zero": "Z", "Cache": "C", "Flush": "F",
         "Extents": "E"}
_FLAG_BITS = {"fua": 2, "trim": 1, "fast": 8, "req_one": 4}


def _time_us(m: re.Match[str]) -> int:
    y, mo, d, h, mi, s, us = (int(m.group(i)) for i in range(1, 8))
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * 1_000_000 + us


def parse_nbdkit_log(lines: list[str]) -> Iterator[dict[str, Any]]:
    """Messages of the view stream from the lines of nbdkit's log filter (1.32's format:
    a call's line ends with " ...", its return starts with "..." and pairs by id)."""
    pending: dict[tuple[int, int], list[Any]] = {}
    yield {"type": "hello", "protocol": 1, "server": "nbdkit log", "exports": {}}
    for line in lines:
        m = _LOG_LINE.match(line)
        if m is None:
            continue
        t, conn, act = _time_us(m), int(m.group(8) or 0), m.group(10)
        rest, leaving = m.group(12), m.group(9) is not None
        fields = dict(_FIELD.findall(rest))
        if act == "Connect":
            yield {"type": "open", "conn": conn, "export": fields.get("export", ""),
                   "size": int(fields.get("size", "0"), 0), "time": t}
        elif act == "Disconnect":
            yield {"type": "close", "conn": conn, "time": t}
        elif act in _KIND and m.group(11):
            key = (conn, int(m.group(11)))
            if not leaving:
                flags = sum(b for k, b in _FLAG_BITS.items() if fields.get(k) == "1")
                pending[key] = [_KIND[act], int(fields.get("offset", "0"), 0),
                                int(fields.get("count", "0"), 0), flags, 0, t, 0, conn]
            elif key in pending:
                ev = pending.pop(key)
                if fields.get("return") == "-1":
                    ev[4] = getattr(errno, fields.get("error", "EIO"), errno.EIO)
                ev[6] = t - ev[5]
                yield {"type": "events", "events": [ev]}
