"""How libnbd's Python glue calls the program's callbacks, converts its arguments and shows
them in debug traces."""

from __future__ import annotations

import operator
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from pynbd.libnbd.buffers import Buffer
from pynbd.libnbd.constants import U32, U64

__all__ = ["call", "check_list", "index", "render", "u32", "u64"]


def index(x: Any) -> int:
    return operator.index(x)


def u64(x: Any) -> int:
    return operator.index(x) & U64


def u32(x: Any) -> int:
    return operator.index(x) & U32


def call(fn: Callable[..., Any], *args: Any) -> int:
    """Call a user callback as libnbd's Python glue does: an exception prints its traceback and
    counts as -1 (AssertionError aborts the process); a non-int result counts as 0."""
    try:
        r = fn(*args)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - libnbd prints any failure and goes on
        # The traceback starts at the callback, as when libnbd's C code calls it.
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        traceback.print_exception(type(e), e, tb)
        if isinstance(e, AssertionError):
            sys.stderr.flush()
            os.abort()
        return -1
    if isinstance(r, bool) or not isinstance(r, int):
        return int(r) if isinstance(r, bool) else 0
    return r


def check_list(value: Any, what: str = "list") -> list[str]:
    if not isinstance(value, list):
        raise TypeError(f"expecting a {what} parameter")
    return [os.fsdecode(v) if isinstance(v, bytes) else str(v) for v in value]


def render(v: Any, ret: bool = False) -> str:
    if v is None:
        return "0" if ret else "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, int):
        return str(v)
    if callable(v):
        return "<fun>"
    if isinstance(v, (bytes, bytearray, memoryview, Buffer)):
        return f"<buf len={len(v)}>"
    if isinstance(v, list):
        return "[" + " ".join(render(x) for x in v) + "]"
    return repr(v)
