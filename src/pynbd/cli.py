"""The ``pynbd`` command: ``pynbd serve|info|copy|sh|dump|fuse|view ...``."""

from __future__ import annotations

import sys

from pynbd import __version__

__all__ = ["main"]

USAGE = """\
usage: pynbd COMMAND [ARGS...]

commands:
  serve    serve an NBD export from a plugin (nbdkit's command line)
  info     show what an NBD server exports (nbdinfo)
  copy     copy to or from an NBD server, a file or a pipe (nbdcopy)
  sh       a Python shell with a libnbd-API handle (nbdsh)
  dump     hexdump an NBD export (nbddump)
  fuse     show an NBD export as a regular file (nbdfuse)
  view     watch exports being used, live in the browser (--filter=view)

`pynbd COMMAND --help` describes each command.
"""


TOOLS = ("info", "copy", "sh", "dump", "fuse", "view")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        # A usage error: the text goes to stderr so a pipe never mistakes it for output.
        sys.stderr.write(USAGE)
        return 1
    if args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        print(f"pynbd {__version__}")
        return 0
    cmd, rest = args[0], args[1:]
    if cmd == "serve":
        from pynbd.server.main import main as serve_main

        return serve_main(rest)
    if cmd in TOOLS:
        import importlib

        # Each tool is a module pynbd.tools.<name> with main(argv) -> exit status.
        module = importlib.import_module(f"pynbd.tools.{cmd}")
        return int(module.main(rest))
    print(f"pynbd: unknown command '{cmd}'. Try 'pynbd --help'.", file=sys.stderr)
    return 1
