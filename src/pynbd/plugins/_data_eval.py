"""The data plugin's language: a tree of nodes to the disk's contents (private).

Every expression evaluates to a :class:`Blob`: a size and the pieces of data written into it
(offset, bytes), later pieces over earlier ones; what no piece covers reads as zeroes. A list
of expressions is laid out with a cursor that each expression advances by its size and that
``@`` moves; a list's size is the furthest the cursor went. Groups, names and variables are
blobs of their own (offsets inside them are relative to their start).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

from pynbd.errors import ConfigError
from pynbd.plugins._data_parse import Node, parse

__all__ = ["Blob", "evaluate"]

#: Largest output read from a <(SCRIPT) whose length is not bounded by a slice.
_MAX_SCRIPT_OUTPUT = 1 << 30


@dataclass
class Blob:
    size: int = 0
    pieces: list[tuple[int, bytes]] = field(default_factory=list)

    def place(self, other: Blob, at: int) -> None:
        self.pieces.extend((at + off, data) for off, data in other.pieces)

    def dense(self) -> bytes | None:
        """The contents as one bytes object, if one piece covers them all."""
        if len(self.pieces) == 1 and self.pieces[0][0] == 0 and \
                len(self.pieces[0][1]) == self.size:
            return self.pieces[0][1]
        return None


def _repeat(b: Blob, n: int) -> Blob:
    if not b.pieces or n == 0:
        return Blob(b.size * n, [])
    whole = b.dense()
    if whole is not None:
        return Blob(b.size * n, [(0, whole * n)])
    out = Blob(b.size * n)
    for k in range(n):
        out.place(b, k * b.size)
    return out


def _slice(b: Blob, lo: int, hi: int | None) -> Blob:
    hi = b.size if hi is None else hi
    if not 0 <= lo <= hi <= b.size:
        raise ConfigError("[N:M] does not describe a valid slice")
    out = Blob(hi - lo)
    for off, data in b.pieces:
        a, e = max(off, lo), min(off + len(data), hi)
        if a < e:
            out.pieces.append((a - lo, data[a - off:e - off]))
    return out


class _Scope:
    def __init__(self, parent: _Scope | None, env: Mapping[str, str]) -> None:
        self.parent = parent
        self.names: dict[str, Blob] = {}
        self.env = env

    def lookup(self, name: str) -> Blob:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        raise ConfigError(f"\\{name} not defined")


def _script(script: str, limit: int | None) -> bytes:
    """The output of ``/bin/sh -c SCRIPT``, at most ``limit`` bytes (then it is stopped)."""
    want = _MAX_SCRIPT_OUTPUT if limit is None else limit
    with subprocess.Popen(["/bin/sh", "-c", script], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        chunks = []
        got = 0
        while got < want:
            chunk = p.stdout.read1(min(1 << 20, want - got))  # type: ignore[attr-defined]
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        stopped = got >= want
        if stopped:
            p.kill()
        p.stdout.close()
        rc = p.wait()
    if rc != 0 and not stopped:
        raise ConfigError("pclose: external command failed")
    return b"".join(chunks)


def _value(node: Node, scope: _Scope) -> Blob:
    """The blob of one expression, before its postfix operators."""
    kind, v = node.kind, node.value
    if kind == "byte":
        assert isinstance(v, int)
        return Blob(1, [(0, bytes((v,)))])
    if kind == "bytes":
        assert isinstance(v, bytes)
        return Blob(len(v), [(0, v)] if v else [])
    if kind == "file":
        assert isinstance(v, str)
        try:
            with open(v, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"{v}: {e.strerror}") from None
        return Blob(len(data), [(0, data)] if data else [])
    if kind == "script":
        assert isinstance(v, str)
        post = node.post[0] if node.post else None
        limit = post[2] if post and post[0] == "slice" else None
        data = _script(v, limit if isinstance(limit, int) else None)
        return Blob(len(data), [(0, data)] if data else [])
    if kind == "group":
        assert isinstance(v, list)
        return _evaluate_list(v, _Scope(scope, scope.env))
    if kind == "name":
        assert isinstance(v, str)
        return scope.lookup(v)
    assert kind == "var" and isinstance(v, str)
    text = scope.env.get(v)
    if text is None:
        raise ConfigError(f"${v}: variable not found")
    return _evaluate_list(parse(text), _Scope(scope, scope.env))


def _evaluate_list(nodes: list[Node], scope: _Scope) -> Blob:
    out = Blob()
    cursor = 0
    for node in nodes:
        if node.kind == "move":
            how, n = cast("tuple[str, int]", node.value)
            if how == "=":
                if n < 0:
                    raise ConfigError(f"data parameter @{n} must not be negative")
                cursor = n
            elif how == "+":
                cursor += n
            elif how == "-":
                if n > cursor:
                    raise ConfigError(f"data parameter @-{n} must not be larger than "
                                      f"the current offset {cursor}")
                cursor -= n
            else:
                if n == 0 or n & (n - 1):
                    raise ConfigError(f"data parameter @^{n} must be a power of 2")
                cursor = (cursor + n - 1) & ~(n - 1)
            out.size = max(out.size, cursor)
            continue
        b = _value(node, scope)
        assigned = False
        for op in node.post:
            if op[0] == "repeat":
                b = _repeat(b, op[1])  # type: ignore[arg-type]
            elif op[0] == "slice":
                b = _slice(b, op[1], op[2])  # type: ignore[arg-type]
            else:
                scope.names[op[1]] = b  # type: ignore[index]
                assigned = True
        if assigned and node.post[-1][0] == "assign":
            continue
        out.place(b, cursor)
        cursor += b.size
        out.size = max(out.size, cursor)
    return out


def evaluate(text: str, variables: Mapping[str, str]) -> Blob:
    """The contents a data string describes; ``$VAR`` comes from ``variables``, then from
    the environment."""
    env = {**os.environ, **variables}
    return _evaluate_list(parse(text), _Scope(None, env))
