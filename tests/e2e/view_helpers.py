"""Helpers for the view filter and ``pynbd view`` tests: a subscriber that reads the stream
in a thread, and a pipelining client."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pynbd.client.blocking import BlockingConnection
from pynbd.tools._view_model import decode_events

__all__ = ["Subscriber", "pipelined", "wait_until"]


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Subscriber:
    """A viewer of a view socket: every message it got, in order. With ``binary``, it
    asks for binary records (an ``events`` message then has them as ``raw``); with
    ``binary="ns"``, for binary records in nanoseconds."""

    def __init__(self, path: str, read: bool = True, rcvbuf: int | None = None,
                 binary: bool | str = False) -> None:
        self.binary = binary
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(path)
        self.messages: list[dict[str, Any]] = []
        self.ended = threading.Event()
        self.reading = threading.Event()
        if read:
            self.reading.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        f = self.sock.makefile("rb")
        try:
            first = f.readline()  # the hello comes whether we read or not
            self.messages.append(json.loads(first))
            if self.binary == "ns":
                assert self.messages[0]["ns"] is True
                self.sock.sendall(b'{"type":"format","events":"binary","time":"ns"}\n')
            elif self.binary:
                assert self.messages[0]["binary"] is True
                self.sock.sendall(b'{"type":"format","events":"binary"}\n')
            self.reading.wait()
            for line in f:
                msg = json.loads(line)
                if msg.get("type") == "events" and "size" in msg:
                    msg["raw"] = f.read(msg["size"])
                    assert len(msg["raw"]) == msg["size"]
                self.messages.append(msg)
        except (OSError, ValueError):
            pass
        finally:
            self.ended.set()

    def wait_hello(self) -> dict[str, Any]:
        wait_until(lambda: bool(self.messages), "the hello message")
        assert self.messages[0]["type"] == "hello"
        return self.messages[0]

    def of_type(self, typ: str) -> list[dict[str, Any]]:
        return [m for m in list(self.messages) if m.get("type") == typ]

    def events(self) -> list[list[Any]]:
        """Every request, as [KIND letter, offset, length, flags, error, time, duration,
        connection]."""
        return [[chr(r[0]) if isinstance(r[0], int) else r[0], *r[1:]]
                for m in self.of_type("events") for r in decode_events(m)]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reading thread
        except OSError:
            pass
        self.reading.set()
        self.thread.join(5)
        self.sock.close()


def pipelined(c: BlockingConnection, requests: list[tuple[int, int, int, Any]],
              depth: int = 32) -> None:
    """Send (cmd, offset, count, payload) requests with up to ``depth`` in flight."""
    outstanding = 0
    for cmd, offset, count, payload in requests:
        if outstanding >= depth:
            c.outcome(c.next_reply())
            outstanding -= 1
        c.send(cmd, offset, count, 0, payload=payload,
               into=memoryview(bytearray(count)) if cmd == 0 else None)
        outstanding += 1
    while outstanding:
        c.outcome(c.next_reply())
        outstanding -= 1
