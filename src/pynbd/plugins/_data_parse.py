"""The data plugin's language: text to a tree of nodes (private).

The grammar (nbdkit 1.32's data format): a list of expressions separated by blanks, each a
byte (``0x55``), a word (``le32:1``), an offset move (``@N``, ``@+N``, ``@-N``, ``@^N``), a
file (``<FILE``), a script's output (``<(SCRIPT)``), a string (``"..."``), a group
(``( ... )``), a name (``\\NAME``) or a variable (``$VAR``), each optionally followed by
postfix operators: ``*N`` (repeat), ``[N:M]`` (slice) and ``-> \\NAME`` (assign).
``#`` starts a comment to the end of the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pynbd.errors import ConfigError
from pynbd.filters._params import _ERANGE_TEXT, _strtol

__all__ = ["Node", "parse"]

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_VAR_RE = re.compile(r"[A-Za-z0-9_]+")
_WORD_RE = re.compile(r"(le|be)(16|32|64):")
_BLANK = " \t\n\v\f\r"
#: Characters that end a bare word (a number, a file name).
_STOP = _BLANK + "*[)("


@dataclass
class Node:
    """One expression: ``kind`` is byte, bytes, move, file, script, group, name or var.

    ``value`` is the byte(s), the move's (how, N), the file name, the script, the group's
    nodes, or the name. ``post`` holds the postfix operators in order: ("repeat", N),
    ("slice", lo, hi) and ("assign", NAME).
    """

    kind: str
    value: object
    post: list[tuple[object, ...]] = field(default_factory=list)


def _number(text: str, bits: int | None = None) -> int:
    """An unsigned number as nbdkit's parse_uintN_t("data", ...) reads it."""
    shown = text.lstrip(_BLANK)
    if shown.startswith("-"):
        raise ConfigError("data: negative numbers are not allowed")
    value, end = _strtol(text)
    if end == 0:
        raise ConfigError("data: empty string where we expected a number")
    if value >= 1 << (bits or 64):
        raise ConfigError(f'data: could not parse number: "{text}": {_ERANGE_TEXT}')
    if end != len(text):
        raise ConfigError(f'data: could not parse number: "{text}": trailing garbage')
    return value


def _int64(text: str) -> int:
    value, end = _strtol(text)
    if end == 0:
        raise ConfigError("data: empty string where we expected a number")
    if end != len(text):
        raise ConfigError(f'data: could not parse number: "{text}": trailing garbage')
    if not -(1 << 63) <= value < 1 << 63:
        raise ConfigError(f'data: could not parse number: "{text}": {_ERANGE_TEXT}')
    return value


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def word(self) -> str:
        j = self.i
        while j < len(self.s) and self.s[j] not in _STOP:
            j += 1
        w = self.s[self.i:j]
        self.i = j
        return w

    def skip_blanks(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in _BLANK:
            self.i += 1

    def parse_list(self, nested: bool) -> list[Node]:
        out: list[Node] = []
        s = self.s
        while True:
            self.skip_blanks()
            if self.i >= len(s):
                if nested:
                    raise ConfigError("unmatched '(' in data string")
                return out
            c = s[self.i]
            if c == "#":
                while self.i < len(s) and s[self.i] != "\n":
                    self.i += 1
            elif c == ")":
                if not nested:
                    raise ConfigError("unmatched ')' in data string")
                self.i += 1
                return out
            elif c in "*[" or s.startswith("->", self.i):
                self.postfix(out)
            else:
                out.append(self.expression(c))

    def expression(self, c: str) -> Node:
        s = self.s
        if c == "(":
            self.i += 1
            return Node("group", self.parse_list(True))
        if c == "@":
            self.i += 1
            how = s[self.i] if self.i < len(s) and s[self.i] in "+-^" else "="
            if how != "=":
                self.i += 1
            w = self.word()
            return Node("move", (how, _number(w) if how != "=" else _int64(w)))
        if c == "<":
            if s.startswith("<(", self.i):
                return Node("script", self.script())
            self.i += 1
            name = self.word()
            if not name:
                raise ConfigError("data parameter: '<' must be followed by a file name")
            return Node("file", name)
        if c == '"':
            return Node("bytes", self.string())
        if c in "\\$":
            self.i += 1
            m = (_NAME_RE if c == "\\" else _VAR_RE).match(s, self.i)
            if m is None:
                what = "\\NAME" if c == "\\" else "$VAR"
                raise ConfigError(f"data parameter: {what} must be followed by a name")
            self.i = m.end()
            return Node("name" if c == "\\" else "var", m.group(0))
        m = _WORD_RE.match(s, self.i)
        if m is not None:
            self.i = m.end()
            bits = int(m.group(2))
            v = _number(self.word(), bits)
            return Node("bytes", v.to_bytes(bits // 8, "little" if m.group(1) == "le" else "big"))
        w = self.word()
        if not w:
            raise ConfigError(f"data parameter: unexpected character '{c}'")
        v = _int64(w)
        if not 0 <= v <= 255:
            raise ConfigError("data parameter BYTE must be in the range 0..255")
        return Node("byte", v)

    def postfix(self, out: list[Node]) -> None:
        s = self.s
        if not out or out[-1].kind == "move":
            raise ConfigError(f"data parameter: '{s[self.i]}' must follow an expression")
        node = out[-1]
        if s[self.i] == "*":
            self.i += 1
            self.skip_blanks()
            node.post.append(("repeat", _number(self.word())))
        elif s[self.i] == "[":
            j = s.find("]", self.i)
            if j < 0 or ":" not in s[self.i:j]:
                raise ConfigError("data parameter: slice must be [N:M]")
            lo, _, hi = s[self.i + 1:j].partition(":")
            node.post.append(("slice", _int64(lo) if lo.strip() else 0,
                              _int64(hi) if hi.strip() else None))
            self.i = j + 1
        else:
            self.i += 2
            self.skip_blanks()
            m = _NAME_RE.match(s, self.i + 1)
            if not s.startswith("\\", self.i) or m is None:
                raise ConfigError("data parameter: -> must be followed by \\NAME")
            self.i = m.end()
            node.post.append(("assign", m.group(0)))

    def script(self) -> str:
        s = self.s
        depth = 0
        j = self.i + 1
        while j < len(s):
            if s[j] == "(":
                depth += 1
            elif s[j] == ")":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        else:
            raise ConfigError("unmatched '(' in data string")
        script = s[self.i + 2:j]
        self.i = j + 1
        return script

    def string(self) -> bytes:
        s = self.s
        out = bytearray()
        j = self.i + 1
        simple = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11,
                  "\\": 92, '"': 34, "'": 39, "?": 63}
        while True:
            if j >= len(s):
                raise ConfigError("data parameter: unterminated string")
            c = s[j]
            if c == '"':
                break
            if c != "\\":
                out += c.encode()
                j += 1
                continue
            e = s[j + 1:j + 2]
            if e in simple:
                out.append(simple[e])
                j += 2
            elif e == "x" and re.match(r"[0-9A-Fa-f]{1,2}", s[j + 2:j + 4]):
                m = re.match(r"[0-9A-Fa-f]{1,2}", s[j + 2:j + 4])
                assert m is not None
                out.append(int(m.group(0), 16))
                j += 2 + m.end()
            elif e and e in "01234567":
                m = re.match(r"[0-7]{1,3}", s[j + 1:j + 4])
                assert m is not None
                out.append(int(m.group(0), 8) & 0xFF)
                j += 1 + m.end()
            else:
                raise ConfigError(f"data parameter: unknown escape sequence '\\{e}' in string")
        self.i = j + 1
        return bytes(out)


def parse(text: str) -> list[Node]:
    """The nodes of a data string; a :class:`ConfigError` with nbdkit's message if bad."""
    return _Parser(text).parse_list(False)
