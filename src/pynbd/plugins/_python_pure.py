"""Which callbacks of an nbdkit-API Python script can never block (for the python plugin).

A callback that never blocks may run on the server's event loop instead of a worker thread:
no thread hop per request, which costs more than the callback itself for a RAM disk. One
that might block -- any I/O, a lock, a sleep, a call into code we cannot see -- must run in
a thread, or it would stall every other client.

"Never blocks" is decided from the function's bytecode, conservatively: straight-line code
(no loops, no ``with``, no ``try``, no imports, no nested functions) that only

- reads and writes its own arguments and locals, except the handle (the first argument,
  which may be any object the script chose, so it may not be used at all);
- reads globals bound to plain data (int, float, bool, str, bytes, bytearray, None, and
  memoryviews of bytes or bytearray) or writes globals;
- calls builtins from a short list (``len``, ``min``, ``bytearray``, ``print``...),
  raises builtin exceptions, and uses the ``nbdkit`` module's non-blocking functions and
  constants, or constants of other modules (``errno.EOPNOTSUPP``);
- does arithmetic, comparisons, slicing and subscripts on those values.

Everything else (an unknown opcode included) makes the callback "may block". Globals can be
rebound at run time, so :meth:`Pure.check` re-checks the globals a callback reads before
each call on the loop (a few dictionary lookups).
"""

from __future__ import annotations

import builtins
import dis
import types
from collections.abc import Callable
from typing import Any

__all__ = ["Pure", "analyse"]

#: Opcodes of straight-line code on plain values (names from Python 3.11 to 3.13). Loops,
#: ``with``, ``try``, imports, closures, attribute stores, generators: not listed, so not
#: pure. LOAD_GLOBAL and LOAD_ATTR are checked separately.
_SAFE_OPS = frozenset((
    "RESUME", "NOP", "CACHE", "EXTENDED_ARG", "POP_TOP", "PUSH_NULL", "COPY", "SWAP",
    "LOAD_FAST", "LOAD_FAST_CHECK", "STORE_FAST", "DELETE_FAST", "LOAD_FAST_LOAD_FAST",
    "STORE_FAST_LOAD_FAST", "STORE_FAST_STORE_FAST", "LOAD_CONST", "RETURN_VALUE",
    "RETURN_CONST", "STORE_GLOBAL", "BINARY_OP", "UNARY_NEGATIVE", "UNARY_NOT", "UNARY_INVERT",
    "COMPARE_OP", "IS_OP", "TO_BOOL", "BINARY_SUBSCR", "STORE_SUBSCR", "BUILD_SLICE",
    "BINARY_SLICE", "STORE_SLICE", "BUILD_TUPLE", "BUILD_STRING", "FORMAT_VALUE",
    "FORMAT_SIMPLE", "FORMAT_WITH_SPEC", "CONVERT_VALUE", "POP_JUMP_IF_FALSE",
    "POP_JUMP_IF_TRUE", "POP_JUMP_IF_NONE", "POP_JUMP_IF_NOT_NONE",
    "POP_JUMP_FORWARD_IF_FALSE", "POP_JUMP_FORWARD_IF_TRUE", "POP_JUMP_FORWARD_IF_NONE",
    "POP_JUMP_FORWARD_IF_NOT_NONE", "JUMP_FORWARD", "JUMP_IF_FALSE_OR_POP",
    "JUMP_IF_TRUE_OR_POP", "PRECALL", "CALL", "KW_NAMES", "RAISE_VARARGS",
))

#: Builtins a pure callback may call (by id: builtins live as long as the interpreter):
#: bounded work on plain values, no I/O. (``print`` writes to /dev/null once the server
#: runs, as nbdkit's stdout does.)
_SAFE_BUILTINS = frozenset(
    id(getattr(builtins, n)) for n in (
        "len", "min", "max", "abs", "bool", "int", "float", "str", "bytes", "bytearray",
        "memoryview", "divmod", "hex", "isinstance", "print", "repr", "round", "type",
    ))
#: The nbdkit module's functions that never block.
_SAFE_NBDKIT = frozenset(("set_error", "export_name", "is_tls", "peer_pid", "peer_uid",
                          "peer_gid", "shutdown", "disconnect", "parse_size", "parse_bool",
                          "parse_probability", "parse_delay"))
#: Types of global values a pure callback may read.
_PLAIN = frozenset((int, float, bool, str, bytes, bytearray, type(None)))
_MISSING = object()
_BUILTINS = builtins.__dict__


def _plain(value: Any) -> bool:
    t = type(value)
    if t in _PLAIN:
        return True
    # a view of memory, not of a file (an mmap could fault in pages from disk)
    return t is memoryview and type(value.obj) in (bytes, bytearray)


def _is_builtin_exception(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseException) and \
        value.__module__ == "builtins"


class Pure:
    """A callback found pure, and the globals to re-check before each call on the loop."""

    __slots__ = ("fn", "name", "plain", "same")

    def __init__(self, name: str, fn: Callable[..., Any], same: dict[str, Any],
                 plain: tuple[str, ...]) -> None:
        self.name = name
        self.fn = fn
        self.same = tuple(same.items())  # global -> the object it must still be
        self.plain = plain  # globals that must still hold plain data

    def check(self, ns: dict[str, Any]) -> bool:
        """Still pure: the script's callback and the globals it reads are unchanged.
        (Called before every request on the loop: kept to a few dictionary lookups.)"""
        get = ns.get
        if get(self.name) is not self.fn:
            return False
        for name, obj in self.same:
            v = get(name, _MISSING)
            if v is not obj and (v is not _MISSING or _BUILTINS.get(name) is not obj):
                return False
        for name in self.plain:
            t = type(get(name))
            if t not in _PLAIN and not (t is memoryview and _plain(get(name))):
                return False
        return True


def analyse(name: str, fn: Any, ns: dict[str, Any], nbdkit: types.ModuleType) -> Pure | None:
    """:class:`Pure` if the script's callback ``fn`` can never block, else None."""
    if type(fn) is not types.FunctionType or fn.__closure__ or fn.__globals__ is not ns:
        return None
    code = fn.__code__
    if code.co_flags & (0x20 | 0x80 | 0x100 | 0x200):  # generator, coroutine, async
        return None
    defaults = (*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values())
    if any(isinstance(c, types.CodeType) for c in code.co_consts) or \
            not all(_plain(d) for d in defaults):
        return None
    handle = code.co_varnames[0] if code.co_argcount and name not in _NO_HANDLE else None
    same: dict[str, Any] = {}
    plain: set[str] = set()
    module: types.ModuleType | None = None  # set when the last instruction loaded one
    for ins in dis.get_instructions(code):
        op = ins.opname
        if op in ("CACHE", "EXTENDED_ARG"):
            continue
        loaded, module = module, None
        if op == "LOAD_GLOBAL":
            if not _global_ok(ins.argval, ns, same, plain):
                return None
            v = same.get(ins.argval)
            if isinstance(v, types.ModuleType):
                module = v
        elif op in ("LOAD_ATTR", "LOAD_METHOD"):
            if loaded is None or not _attr_ok(loaded, ins.argval, nbdkit):
                return None
        elif op not in _SAFE_OPS:
            return None
        elif op.startswith("LOAD_FAST") and handle is not None and handle in _names(ins):
            return None  # the handle may be any object: not used at all
    return Pure(name, fn, same, tuple(sorted(plain)))


#: Callbacks whose first argument is not the handle.
_NO_HANDLE = frozenset(("open", "preconnect", "list_exports", "default_export", "config"))


def _names(ins: dis.Instruction) -> tuple[str, ...]:
    v = ins.argval
    return v if isinstance(v, tuple) else (v,)


def _global_ok(name: str, ns: dict[str, Any], same: dict[str, Any], plain: set[str]) -> bool:
    v = ns.get(name, _MISSING)
    if v is _MISSING:
        v = getattr(builtins, name, _MISSING)
        if v is _MISSING:
            return False
    if isinstance(v, types.ModuleType) or id(v) in _SAFE_BUILTINS or _is_builtin_exception(v):
        same[name] = v
        return True
    if _plain(v):
        plain.add(name)
        return True
    return False


def _attr_ok(module: types.ModuleType, attr: str, nbdkit: types.ModuleType) -> bool:
    v = getattr(module, attr, _MISSING)
    if module is nbdkit and attr in _SAFE_NBDKIT:
        return True
    return not callable(v) and type(v) in _PLAIN  # a constant (nbdkit.FLAG_FUA, errno.EIO)
