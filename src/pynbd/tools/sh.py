"""``pynbd sh``: a Python shell with a libnbd-API handle, as libnbd's nbdsh 1.14 is.

::

    pynbd sh [-u URI] [--base-allocation] [--opt-mode] [-c CODE | -c -]... [-n] [-v]
    pynbd sh [...] SCRIPT|- [ARGS...]

The module ``pynbd.libnbd`` is loaded under the name ``nbd`` and, unless ``-n``, a handle
``h = nbd.NBD()`` named ``"nbdsh"`` exists. ``-u``, ``--base-allocation``, ``--opt-mode``
and ``-c`` run in command-line order, exactly as nbdsh's (``--opt-mode -u URI -c
'h.opt_go()'`` works); without ``-c`` (and without a script) an interactive shell starts
with the ``nbd>`` prompt, nbdsh's banner, readline line editing, history and tab
completion. An ``nbd.Error`` from the command line prints ``pynbd sh: command line script
failed: MESSAGE`` and exits 1 (with ``-v`` or ``LIBNBD_DEBUG=1``, the traceback); any other
exception prints its traceback and exits 1; ``sys.exit(N)`` exits N.

Beyond nbdsh: a SCRIPT file argument (or ``-`` for standard input) runs after the options'
snippets as ``__main__``, with ``sys.argv = [SCRIPT, ARGS...]``; and ``h`` exists in the
interactive shell (nbdsh 1.14.2 starts its shell without it, a bug fixed upstream later).
Messages name ``pynbd sh`` where nbdsh names itself, and ``-V`` prints pynbd's version, then
libnbd's.
"""

from __future__ import annotations

import argparse
import builtins
import code
import contextlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from pynbd import __version__
from pynbd import libnbd as nbd

__all__ = ["HISTORY_ENV", "main", "make_banner"]

#: The program name that starts every message (nbdsh's messages, named for this command).
PROG = "pynbd sh"

#: Environment variable naming the interactive history file ("" turns the file off).
HISTORY_ENV = "PYNBD_SH_HISTORY"
DEFAULT_HISTORY = "~/.pynbd_sh_history"
#: Lines kept in the history file.
HISTORY_LENGTH = 1000


class _Exit(BaseException):  # not an Exception: user code cannot swallow it
    def __init__(self, status: int) -> None:
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse with nbdsh's options; a usage error is one line (``pynbd sh: error: ...``)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise _Exit(2)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


class _SnippetAction(argparse.Action):
    """Appends (kind, value) to one list, so the options replay in command-line order."""

    def __init__(self, option_strings: Sequence[str], dest: str, nargs: Any = None,
                 default: Any = argparse.SUPPRESS, **kwargs: Any) -> None:
        if nargs not in (0, None):
            raise ValueError("nargs must be 0 or None")
        super().__init__(option_strings, dest, nargs=nargs, default=default, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        dest = self.dest
        if dest != "command":
            namespace.need_handle += 1
        elif values == "-":
            dest = "stdin"
        namespace.snippets = [*namespace.snippets, (dest, values)]


def _parser() -> tuple[_Parser, list[str], list[str]]:
    parser = _Parser(
        prog=PROG,
        description="Network Block Device (NBD) shell",
        epilog="pynbd sh follows libnbd's nbdsh: its options, the handle h and its"
        " namespace. Please read docs/sh.md (or nbdsh(1)) for full usage. SCRIPT and ARGS are"
        " a pynbd extension: run SCRIPT (- for standard input) after the options, as"
        " __main__, with sys.argv = [SCRIPT, ARGS...].",
    )
    parser.set_defaults(need_handle=0, snippets=[])
    short: list[str] = []
    long: list[str] = []
    parser.add_argument("--base-allocation", action=_SnippetAction, nargs=0,
                        help='request the "base:allocation" meta context')
    long.append("--base-allocation")
    parser.add_argument("-c", "--command", action=_SnippetAction,
                        help="run a Python statement (may be used multiple times)")
    short.append("-c")
    long.append("--command")
    parser.add_argument("-n", action="store_true", help="do not create the implicit handle 'h'")
    short.append("-n")
    parser.add_argument("--opt-mode", action=_SnippetAction, nargs=0,
                        help="request opt mode during connection")
    long.append("--opt-mode")
    parser.add_argument("-u", "--uri", action=_SnippetAction, help="connect to NBD URI")
    short.append("-u")
    long.append("--uri")
    # nbdsh keeps --connect as an undocumented synonym of --uri.
    parser.add_argument("--connect", dest="uri", action=_SnippetAction, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="enable verbose debugging")
    short.append("-v")
    long.append("--verbose")
    parser.add_argument("-V", "--version", action="store_true",
                        help="display version information")
    short.append("-V")
    long.append("--version")
    # Hidden options used by bash tab completion.
    parser.add_argument("--short-options", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--long-options", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("script", nargs="?", metavar="SCRIPT",
                        help="a Python file to run after the options (- for standard input)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="sys.argv[1:] for SCRIPT")
    return parser, short, long


def make_banner(h: nbd.NBD | None) -> str:
    """nbdsh 1.14's banner for handle `h` (None with ``-n``)."""
    lines: list[str] = []

    def example(ex: str, desc: str) -> None:
        lines.append(f"{ex:<34} # {desc}")

    connect_hint = False
    go_hint = False
    lines += ["", "Welcome to nbdsh, the shell for interacting with",
              "Network Block Device (NBD) servers.", ""]
    if h is None:
        lines += ["The ‘nbd’ module has already been imported.", ""]
        example("h = nbd.NBD()", "Create a new handle.")
        connect_hint = True
    else:
        state = h.connection_state()
        state = state[: state.find(":")]
        lines += ["The ‘nbd’ module has already been imported and there",
                  f"is an open NBD handle called ‘h’ in state '{state}'.", ""]
        if h.aio_is_created():
            connect_hint = True
            if h.get_opt_mode():
                go_hint = True
        elif h.aio_is_negotiating():
            go_hint = True
    if connect_hint:
        example('h.connect_tcp("remote", "10809")', "Connect to a remote server.")
    if go_hint:
        example("h.opt_go()", "Finish option negotiation")
    example("h.get_size()", "Get size of the remote disk.")
    example("buf = h.pread(512, 0)", "Read the first sector.")
    example("exit() or Ctrl-D", "Quit the shell")
    example("help(nbd)", "Display documentation")
    lines.append("")
    return "\n".join(lines)


def _print_user_traceback(exc: BaseException) -> None:
    """The traceback of an exception from user code, without this module's frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _system_exit_status(e: SystemExit) -> int:
    """What the interpreter would exit with for an uncaught `e` (printing a message)."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _setup_readline(ns: dict[str, Any]) -> str | None:
    """Line editing, tab completion over `ns` and a history file; returns that file."""
    try:
        import readline
        import rlcompleter
    except ImportError:  # a Python built without readline: a plain prompt still works
        return None
    readline.set_completer(rlcompleter.Completer(ns).complete)
    if "libedit" in (getattr(readline, "__doc__", "") or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    path = os.environ.get(HISTORY_ENV, DEFAULT_HISTORY)
    if not path:
        return None
    path = os.path.expanduser(path)
    readline.set_history_length(HISTORY_LENGTH)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    return path


def _save_history(path: str | None) -> None:
    if path is None:
        return
    import readline

    with contextlib.suppress(OSError):
        readline.write_history_file(path)


def _interact(ns: dict[str, Any], h: nbd.NBD | None) -> int:
    sys.ps1 = "nbd> "
    history = _setup_readline(ns) if sys.stdin.isatty() else None
    try:
        code.interact(banner=make_banner(h), local=ns, exitmsg="")
    except SystemExit as e:
        return _system_exit_status(e)
    finally:
        _save_history(history)
    return 0


def _read_script(path: str) -> tuple[str, str]:
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    except OSError as e:
        print(f"{PROG}: can't open file '{path}': [Errno {e.errno}] {e.strerror}",
              file=sys.stderr)
        raise _Exit(2) from None


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except _Exit as e:
        return e.status


def _early_answer(args: argparse.Namespace, short_options: list[str],
                  long_options: list[str]) -> int | None:
    """Handle the options that end nbdsh before any snippet runs: the exit status, or None."""
    if args.n and args.need_handle:
        print(f"{PROG}: error: -n option cannot be used with --base-allocation, --opt-mode"
              " or --uri", file=sys.stderr)
        return 1
    if args.version:
        print(f"{PROG} {__version__}\n{nbd.package_name} {nbd.__version__}")
        return 0
    if args.short_options:
        print("\n".join(sorted(short_options)))
        return 0
    if args.long_options:
        print("\n".join(sorted(long_options)))
        return 0
    return None


def _namespace(h: nbd.NBD | None) -> dict[str, Any]:
    """The names nbdsh's snippets see: the module, the handle and what nbdsh itself
    imported."""
    ns: dict[str, Any] = {
        "__name__": "nbdsh",
        "__builtins__": builtins,
        "nbd": nbd,
        "argparse": argparse,
        "code": code,
        "os": os,
        "sys": sys,
        "traceback": traceback,
    }
    if h is not None:
        ns["h"] = h
    return ns


def _handle_op(h: nbd.NBD | None, act: str, arg: Any) -> None:
    """One of the handle options (--base-allocation, --opt-mode, --uri), in its turn."""
    assert h is not None
    if act == "base_allocation":
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    elif act == "opt_mode":
        h.set_opt_mode(True)
    else:
        h.connect_uri(arg)


def _run_snippets(args: argparse.Namespace, ns: dict[str, Any], h: nbd.NBD | None) -> int | None:
    """Run the -c/- snippets, handle options and the script in order: the exit status if
    one failed or exited, else None."""

    def run(source: str, filename: str) -> None:
        exec(compile(source, filename, "exec"), ns)  # noqa: S102 - running user code is the job

    try:
        for act, arg in args.snippets:
            if act == "command":
                run(arg, "<string>")
            elif act == "stdin":
                run(sys.stdin.read(), "<string>")
            else:
                _handle_op(h, act, arg)
        if args.script is not None:
            source, filename = _read_script(args.script)
            ns["__name__"] = "__main__"
            ns["__file__"] = filename
            sys.argv = [args.script, *args.script_args]
            run(source, filename)
    except nbd.Error as ex:
        if os.environ.get("LIBNBD_DEBUG") == "1":
            _print_user_traceback(ex)
        else:
            print(f"{PROG}: command line script failed: {ex.string}", file=sys.stderr)
        return 1
    except SystemExit as e:
        return _system_exit_status(e)
    except KeyboardInterrupt as e:
        _print_user_traceback(e)
        return 130
    except Exception as e:  # noqa: BLE001 - any error of user code, reported as Python would
        _print_user_traceback(e)
        return 1
    return None


def _main(argv: list[str]) -> int:
    parser, short_options, long_options = _parser()
    args = parser.parse_args(argv)
    status = _early_answer(args, short_options, long_options)
    if status is not None:
        return status
    if args.verbose:
        os.environ["LIBNBD_DEBUG"] = "1"

    h: nbd.NBD | None = None
    if not args.n:
        h = nbd.NBD()
        h.set_handle_name("nbdsh")
    ns = _namespace(h)
    try:
        status = _run_snippets(args, ns, h)
        if status is not None:
            return status
        if len(args.snippets) - args.need_handle == 0 and args.script is None:
            return _interact(ns, h)
        return 0
    finally:
        if h is not None:
            with contextlib.suppress(Exception):
                h.close()
