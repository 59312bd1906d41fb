"""GNU ``getopt_long`` as glibc runs it, for tools that must accept libnbd's command lines.

libnbd's tools parse their arguments with glibc's ``getopt_long``; scripts rely on what it
accepts: options after operands (argument permutation), ``--`` ending the options, unique
abbreviations of long options (``--js`` is ``--json``), ``--opt=value`` and ``--opt value`` for
required arguments, ``--opt=value`` only for optional ones, and bundled short options
(``-LV``). :mod:`getopt` in the standard library has no optional arguments and other messages,
so this is the same algorithm written out, with glibc's messages (without the program name).

``POSIXLY_CORRECT`` in the environment (or a short-option string starting with ``+``) stops at
the first operand, as in glibc.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

__all__ = [
    "GetoptError",
    "LongOption",
    "getopt_long",
    "long_option_list",
    "print_listing",
    "short_option_list",
]

NO_ARGUMENT = 0
REQUIRED_ARGUMENT = 1
OPTIONAL_ARGUMENT = 2


class LongOption:
    """One entry of a ``struct option`` table: the name, its argument kind and its key.

    Options with the same `key` are aliases: an abbreviation matching only aliases of one
    option is not ambiguous (glibc compares ``has_arg``, ``flag`` and ``val``).
    """

    __slots__ = ("has_arg", "key", "name")

    def __init__(self, name: str, has_arg: int, key: str) -> None:
        self.name = name
        self.has_arg = has_arg
        self.key = key

    def __repr__(self) -> str:
        return f"LongOption({self.name!r}, {self.has_arg}, {self.key!r})"


class GetoptError(Exception):
    """A command-line error, worded as glibc's getopt words it (without the program name)."""


def getopt_long(
    args: list[str], short: str, longopts: Sequence[LongOption],
    on_option: Callable[[str, str | None], None] | None = None,
) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Parse `args` (without the program name).

    Returns ``(options, operands)``: options in command-line order as ``(key, value)`` where
    `key` is the long option's key or the short option letter, and `value` its argument or
    None. Raises :class:`GetoptError` at the first error, as getopt returns ``'?'``.
    ``on_option(key, value)``, if given, is called for each option as it is met, before the
    rest is parsed (a tool that acts on ``--help`` at once then never sees a later error).
    """
    posix = short.startswith("+") or "POSIXLY_CORRECT" in os.environ
    short = short.lstrip("+-")
    opts: list[tuple[str, str | None]] = []
    operands: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands.extend(args[i:])
            break
        n = len(opts)
        if arg.startswith("--"):
            i = _long(arg, args, i, longopts, opts)
        elif arg.startswith("-") and arg != "-":
            i = _short(arg, args, i, short, opts, on_option)
        else:
            operands.append(arg)
            if posix:
                operands.extend(args[i:])
                break
        if on_option is not None and arg.startswith("--"):
            for key, value in opts[n:]:
                on_option(key, value)
    return opts, operands


def _long(arg: str, args: list[str], i: int, longopts: Sequence[LongOption],
          opts: list[tuple[str, str | None]]) -> int:
    body = arg[2:]
    name, eq, value = body.partition("=")
    found = next((o for o in longopts if o.name == name), None)
    if found is None:
        matches = [o for o in longopts if o.name.startswith(name)]
        if not matches:
            # glibc names what was written, "=value" included
            raise GetoptError(f"unrecognized option '{arg}'")
        found = matches[0]
        # glibc lists the first match and every later one that differs from it.
        others = [o for o in matches[1:] if (o.has_arg, o.key) != (found.has_arg, found.key)]
        if others:
            names = " ".join(f"'--{o.name}'" for o in [found, *others])
            raise GetoptError(f"option '{arg}' is ambiguous; possibilities: {names}")
    if eq:
        if found.has_arg == NO_ARGUMENT:
            raise GetoptError(f"option '--{found.name}' doesn't allow an argument")
        opts.append((found.key, value))
    elif found.has_arg == REQUIRED_ARGUMENT:
        if i >= len(args):
            raise GetoptError(f"option '--{found.name}' requires an argument")
        opts.append((found.key, args[i]))
        i += 1
    else:
        opts.append((found.key, None))
    return i


def _short(arg: str, args: list[str], i: int, short: str,
           opts: list[tuple[str, str | None]],
           on_option: Callable[[str, str | None], None] | None) -> int:
    j = 1
    while j < len(arg):
        c = arg[j]
        j += 1
        pos = short.find(c)
        if pos < 0 or c == ":":
            raise GetoptError(f"invalid option -- '{c}'")
        spec = short[pos + 1:pos + 3]
        if spec.startswith("::"):  # optional: only attached
            opts.append((c, arg[j:] or None))
        elif spec.startswith(":"):  # required: attached or the next word
            if j < len(arg):
                opts.append((c, arg[j:]))
            elif i < len(args):
                opts.append((c, args[i]))
                i += 1
            else:
                raise GetoptError(f"option requires an argument -- '{c}'")
        else:
            opts.append((c, None))
            if on_option is not None:
                on_option(c, None)
            continue
        if on_option is not None:
            on_option(*opts[-1])
        return i
    return i


def long_option_list(longopts: Sequence[LongOption]) -> str:
    """What libnbd's tools print for ``--long-options`` (shell completion): each long option
    but the two listing ones, one per line."""
    return "".join(f"--{o.name}\n" for o in longopts
                   if o.name not in ("long-options", "short-options"))


def short_option_list(short: str) -> str:
    """What libnbd's tools print for ``--short-options``: each short option, one per line."""
    return "".join(f"-{c}\n" for c in short.lstrip("+-") if c != ":")


def print_listing(key: str, usage: str, longopts: Sequence[LongOption], short: str) -> bool:
    """Answer ``--help``, ``--long-options`` and ``--short-options`` (``key`` is the option's
    key) as libnbd's tools do, on standard output; True if it was one of them (the tool
    then exits 0)."""
    if key == "help":
        text = usage
    elif key == "long-options":
        text = long_option_list(longopts)
    elif key == "short-options":
        text = short_option_list(short)
    else:
        return False
    sys.stdout.write(text)
    return True
