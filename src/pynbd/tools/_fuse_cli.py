"""``pynbd fuse``'s command line: its usage text, the parsed :class:`Options` and how the
server it names is described and reached (:mod:`pynbd.tools.fuse` runs them)."""

from __future__ import annotations

import getopt
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from pynbd import __version__

__all__ = ["ADDRESS_MODES", "DEFAULT_CONNECTIONS", "FUSE_HELP", "PROG", "USAGE", "Options",
           "UsageError", "address", "describe", "errmsg", "parse_args"]

PROG = "pynbd fuse"

USAGE = """\

Mount NBD server as a virtual file:

    pynbd fuse [-C N|--connections N] [-d] [-o FUSE-OPTION] [-P PIDFILE]
               [-r] [-s] [-v] [-f|--foreground|--background]
               MOUNTPOINT[/FILENAME] URI

Other modes:

    pynbd fuse MOUNTPOINT[/FILENAME] [ CMD [ARGS ...] ]
    pynbd fuse MOUNTPOINT[/FILENAME] --command CMD [ARGS ...]
    pynbd fuse MOUNTPOINT[/FILENAME] --socket-activation CMD [ARGS ...]
    pynbd fuse MOUNTPOINT[/FILENAME] --fd N
    pynbd fuse MOUNTPOINT[/FILENAME] --tcp HOST PORT
    pynbd fuse MOUNTPOINT[/FILENAME] --unix SOCKET
    pynbd fuse MOUNTPOINT[/FILENAME] --vsock CID PORT

To unmount:

    fusermount3 -u MOUNTPOINT

Other options:

    pynbd fuse --help
    pynbd fuse --fuse-help
    pynbd fuse -V|--version

Please read docs/fuse.md for full usage.

"""

FUSE_HELP = """\
FUSE options (-o OPT[,OPT...]):
    -o allow_other          allow other users to use the file (needs user_allow_other
                            in /etc/fuse.conf when not root)
    -o default_permissions  let the kernel check the file's permission bits
    -o kernel_cache         keep the kernel's page cache across opens
    -o direct_io            bypass the page cache: each read/write goes straight to the server
    -o max_read=N           largest read the kernel sends (bytes)
    -o max_readahead=N      largest readahead the kernel does (bytes)
    -o uid=N, -o gid=N      owner shown for the file
    -o ro                   mount read-only (as -r)
    -o rw                   (the default)
    -o fsname=NAME          the name shown as the mount's source
    -o subtype=NAME         the name after "fuse." in the mount type
"""

#: nbdfuse's default number of connections when the server allows multi-conn.
DEFAULT_CONNECTIONS = 4


class UsageError(Exception):
    pass


@dataclass
class Options:
    connections: int = DEFAULT_CONNECTIONS
    verbose: bool = False
    readonly: bool = False
    mount_ro: bool = False  # -o ro: a read-only mount (EROFS); -r alone gives EACCES
    single: bool = False
    background: bool = False
    pidfile: str | None = None
    mountpoint: str = ""
    filename: str = "nbd"
    file_mode: bool = False
    # FUSE options
    mount_options: list[str] = field(default_factory=list)
    kernel_cache: bool = False
    direct_io: bool = False
    max_readahead: int | None = None
    uid: int = field(default_factory=os.geteuid)
    gid: int = field(default_factory=os.getegid)
    fsname: str = "pynbd"
    subtype: str = "pynbd"
    # the server
    mode: str = "uri"
    args: list[str] = field(default_factory=list)
    #: The working directory the command line's relative paths are relative to (this
    #: process and its workers leave it before mounting).
    cwd: str = ""


def _int_arg(what: str, s: str, lo: int = 0) -> int:
    try:
        v = int(s, 0)
    except ValueError:
        raise UsageError(f"could not parse {what}: {s}") from None
    if v < lo:
        raise UsageError(f"{what} out of range: {s}")
    return v


def _fuse_option(o: Options, opt: str) -> None:
    name, eq, value = opt.partition("=")
    if not name:
        return
    if name in ("allow_other", "default_permissions", "allow_root") and not eq:
        if name == "allow_root":  # libfuse turns allow_root into allow_other + a check
            name = "allow_other"
        o.mount_options.append(name)
    elif name == "max_read" and eq:
        o.mount_options.append(f"max_read={_int_arg('max_read', value, 1)}")
    elif name == "max_readahead" and eq:
        o.max_readahead = _int_arg("max_readahead", value)
    elif name == "kernel_cache" and not eq:
        o.kernel_cache = True
    elif name == "direct_io" and not eq:
        o.direct_io = True
    elif name == "uid" and eq:
        o.uid = _int_arg("uid", value)
    elif name == "gid" and eq:
        o.gid = _int_arg("gid", value)
    elif name == "ro" and not eq:
        o.readonly = o.mount_ro = True
    elif name == "rw" and not eq:
        pass
    elif name in ("fsname", "subtype") and eq and value and "," not in value:
        setattr(o, name, value)
    else:
        raise UsageError(f"unknown FUSE option: -o {opt} (see --fuse-help)")


def parse_args(argv: list[str]) -> Options | int:
    """Parse the command line; an int is an exit status (after --help etc.)."""
    o = Options(cwd=os.getcwd())
    try:
        # POSIX getopt stops at the first non-option (the mountpoint), as nbdfuse's "+".
        opts, rest = getopt.getopt(argv, "C:dfo:P:rsvV", [
            "connections=", "foreground", "background", "fuse-help", "help", "pidfile=",
            "pid-file=", "readonly", "read-only", "verbose", "version"])
    except getopt.GetoptError as e:
        raise UsageError(str(e)) from None
    for k, v in opts:
        if k == "--help":
            sys.stdout.write(USAGE)
            return 0
        if k == "--fuse-help":
            sys.stdout.write(FUSE_HELP)
            return 0
        if k in ("-V", "--version"):
            print(f"pynbd fuse {__version__}")
            return 0
        if k in ("-C", "--connections"):
            o.connections = _int_arg("number of connections", v, 1)
        elif k in ("-d", "-v", "--verbose"):
            o.verbose = True
        elif k in ("-f", "--foreground"):
            o.background = False
        elif k == "--background":
            o.background = True
        elif k == "-o":
            for part in v.split(","):
                _fuse_option(o, part)
        elif k in ("-P", "--pidfile", "--pid-file"):
            o.pidfile = os.path.abspath(v)
        elif k in ("-r", "--readonly", "--read-only"):
            o.readonly = True
        elif k == "-s":
            o.single = True
    if len(rest) < 2:
        raise UsageError("needs a MOUNTPOINT and a URI or a mode (see --help)"
                         if not rest else "needs a URI or a mode after the mountpoint "
                         "(see --help)")
    _mountpoint(o, rest[0])
    o.mountpoint = os.path.abspath(o.mountpoint)
    _mode(o, rest[1:])
    return o


def _mountpoint(o: Options, s: str) -> None:
    """MOUNTPOINT (a regular file: mounted over), MOUNTPOINT (a directory: holds "nbd") or
    MOUNTPOINT/FILENAME, as nbdfuse decides."""
    if os.path.isfile(s):
        o.file_mode = True
        o.mountpoint = s
        o.filename = os.path.basename(s)
        return
    if os.path.isdir(s):
        o.mountpoint = s
        o.filename = "nbd"
        return
    head, sep, tail = s.rpartition("/")
    if not sep or not tail or not os.path.isdir(head or "/"):
        raise UsageError(f'{s}: mountpoint must be "directory" or "directory/filename"')
    o.mountpoint = head or "/"
    o.filename = tail


def _mode(o: Options, a: list[str]) -> None:
    first = a[0]
    modes = {"--command": "command", "--cmd": "command", "[": "bracket",
             "--socket-activation": "socket-activation",
             "--systemd-socket-activation": "socket-activation",
             "--fd": "fd", "--tcp": "tcp", "--unix": "unix", "--vsock": "vsock",
             "--uri": "uri"}
    if first in modes:
        o.mode = modes[first]
        a = a[1:]
    elif first.startswith("-"):
        raise UsageError(f"unknown mode: {first} (see --help)")
    else:
        o.mode = "uri"
    need = {"uri": "a URI", "fd": "a file descriptor number", "unix": "a socket path",
            "tcp": "HOST PORT", "vsock": "CID PORT"}
    if o.mode in ("uri", "fd", "unix"):
        if len(a) != 1:
            raise UsageError(f"{first if o.mode != 'uri' or first == '--uri' else 'URI mode'}"
                             f": needs exactly {need[o.mode]}")
    elif o.mode in ("tcp", "vsock"):
        if len(a) != 2:
            raise UsageError(f"{first}: needs {need[o.mode]}")
    elif o.mode == "bracket":
        if len(a) < 2 or a[-1] != "]":
            raise UsageError("[ CMD ... ]: needs a command and a closing ] (a separate word)")
        a = a[:-1]
    elif not a:
        raise UsageError(f"{first}: needs a command to run")
    if o.mode == "fd":
        _int_arg("file descriptor", a[0])
    elif o.mode == "vsock":
        _int_arg("vsock cid", a[0])
        _int_arg("vsock port", a[1])
    elif o.mode == "tcp":
        _int_arg("port", a[1])
    o.args = a


def errmsg(e: BaseException) -> str:
    if isinstance(e, OSError) and (e.errno or e.strerror):
        text = os.strerror(e.errno) if e.errno else str(e.strerror)
        return text + (f": {e.filename}" if e.filename else "")
    return str(e) or type(e).__name__


def describe(o: Options) -> str:
    """The server, as the user gave it, for error messages."""
    if o.mode in ("uri", "unix"):
        return o.args[0]
    if o.mode == "tcp":
        return f"{o.args[0]}:{o.args[1]}"
    if o.mode == "vsock":
        return f"vsock {o.args[0]}:{o.args[1]}"
    if o.mode == "fd":
        return f"fd {o.args[0]}"
    return o.args[0]  # the command


#: The modes that name an address (any number of connections can be opened to it).
ADDRESS_MODES = ("uri", "tcp", "unix", "vsock")


def address(o: Options) -> dict[str, Any]:
    """The connect keywords for an address mode (both clients take them). A relative Unix
    socket path is taken from the directory the command was run in (the worker processes
    run in ``/``)."""
    if o.mode == "uri":
        from pynbd.client.negotiate import uri_target

        t = uri_target(o.args[0])
        path = t.get("unix")
        tls = t["tls"]
        if tls is not None:  # relative tls-certificates= / tls-psk-file= paths too
            for attr in ("certificates", "psk_file"):
                v = getattr(tls, attr)
                if v:
                    setattr(tls, attr, os.path.join(o.cwd, v))
            del t["tls"]
            if path is not None and path and not path.startswith("\0"):
                t["unix"] = os.path.join(o.cwd, path)
            return {**t, "tls": tls}
        if path is None or path.startswith(("/", "\0")) or not path:
            return {"uri": o.args[0]}
        return {"unix": os.path.join(o.cwd, path), "export_name": t["export_name"]}
    if o.mode == "tcp":
        return {"host": o.args[0], "port": int(o.args[1], 0)}
    if o.mode == "vsock":
        return {"vsock": (int(o.args[0], 0), int(o.args[1], 0))}
    return {"unix": os.path.join(o.cwd, o.args[0])}


