"""What ``pynbd info``'s parts share: the spooled output (with nbdinfo's ANSI colours),
nbdinfo's formatting helpers and its ways of failing."""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn, TypeVar

from pynbd import libnbd as nbd

__all__ = ["BG_BLACK", "BG_LIGHT_GREY", "FG_BOLD_BLACK", "FG_BRIGHT_WHITE", "FG_GREEN",
           "FG_GREY", "FG_RED", "PROG", "Exit", "Output", "fail", "fmt_g", "human_size",
           "json_string", "nbd_fail", "tf", "try_"]

#: The program name that starts every message, as nbdinfo's argv[0].
PROG = "pynbd info"

# ANSI colours nbdinfo uses (libnbd common/include/ansi-colours.h).
FG_BOLD_BLACK = "1;30"
FG_GREEN = "22;32"
FG_GREY = "22;90"
FG_RED = "22;31"
FG_BRIGHT_WHITE = "1;37"
BG_BLACK = "40"
BG_LIGHT_GREY = "47"

_T = TypeVar("_T")


class Exit(Exception):
    """Leave main() with `status`, after printing `message` (if any) on stderr."""

    def __init__(self, status: int, message: str | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


def fail(message: str) -> NoReturn:
    raise Exit(1, f"{PROG}: {message}")


def nbd_fail(e: nbd.Error) -> NoReturn:
    # nbdinfo prints nbd_get_error(): the message without Python's "(EINVAL)" suffix.
    fail(str(e.string))


def try_(call: Callable[[], _T], default: _T) -> _T:
    """A getter that nbdinfo calls and whose failure (-1 / NULL) it only skips."""
    try:
        return call()
    except nbd.Error:
        return default


def human_size(n: int) -> tuple[str, bool]:
    """libnbd's human_size(): ``1048576 -> ("1M", True)``, ``1000 -> ("1000", False)``."""
    ext = ["E", "P", "T", "G", "M", "K", ""]
    i = 6
    if n != 0:
        while n & 1023 == 0:
            n >>= 10
            i -= 1
    return f"{n}{ext[i]}", ext[i] != ""


def json_string(s: str) -> str:
    """A JSON string as nbdinfo's print_json_string writes it (only ``\\``, ``"`` and
    control characters below 0x20 escaped)."""
    out = ['"']
    for c in s:
        if c in '\\"':
            out.append("\\" + c)
        elif ord(c) < 0x20:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


class Output:
    """Output spooled until the end (an error leaves nothing half-written on stdout)."""

    colour: bool
    out: list[str]

    def w(self, s: str) -> None:
        self.out.append(s)

    def ansi_colour(self, code: str) -> None:
        if self.colour:
            self.out.append(f"\033[{code}m")

    def ansi_restore(self) -> None:
        if self.colour:
            self.out.append("\033[0m")


def tf(v: int) -> str:
    return "true" if v else "false"


def fmt_g(x: float) -> str:
    """C's ``%g``."""
    return f"{x:g}"
