"""``pynbd info``: what libnbd's ``nbdinfo`` (1.14) shows about an NBD server, byte for byte.

    pynbd info [--json] NBD-URI | [ CMD ARGS ... ]
    pynbd info --size [--json] NBD
    pynbd info --is read-only|rotational|tls NBD
    pynbd info --can cache|connect|df|fast-zero|flush|fua|multi-conn|read|
                     structured-reply|trim|write|zero NBD
    pynbd info --map[=CONTEXT] [--totals] [--json] NBD
    pynbd info -L|--list [--json] NBD

The text, the JSON, the exit codes (``--is``/``--can``: 0 true, 2 false, 1 error) and the
order of the calls made on the connection are nbdinfo 1.14.2's (libnbd ``info/*.c``): this is
that program written over :mod:`pynbd.libnbd`, so scripts that parse nbdinfo's output parse
this one. Output is gathered in memory and written only at the end; on an error nothing but
what nbdinfo itself prints reaches stdout. See docs/info.md for the differences.

Its parts: the account of one export (:mod:`~pynbd.tools._info_export`), ``--map``
(:mod:`~pynbd.tools._info_map`) and what they share (:mod:`~pynbd.tools._info_output`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from pynbd import __version__
from pynbd import libnbd as nbd
from pynbd.tools._getopt import (
    NO_ARGUMENT,
    OPTIONAL_ARGUMENT,
    REQUIRED_ARGUMENT,
    GetoptError,
    LongOption,
    getopt_long,
    print_listing,
)
from pynbd.tools._info_export import ShowExport
from pynbd.tools._info_map import ShowMap
from pynbd.tools._info_output import (
    FG_GREY,
    PROG,
    Exit,
    fail,
    human_size,
    json_string,
    nbd_fail,
    tf,
    try_,
)

__all__ = ["PROG", "human_size", "json_string", "main"]

#: nbdinfo's exit status for "--is/--can: false" (true is 0, an error 1).
EXIT_FALSE = 2

USAGE = """\

Display information and metadata about NBD servers and exports:

    pynbd info [--json] NBD-URI | [ CMD ARGS ... ]
    pynbd info --size [--json] NBD-URI | [ CMD ARGS ... ]
    pynbd info --is read-only|rotational NBD-URI | [ CMD ARGS ... ]
    pynbd info --can cache|connect|... NBD-URI | [ CMD ARGS ... ]
    pynbd info --map [--totals] [--json] NBD-URI | [ CMD ARGS ... ]
    pynbd info -L|--list [--json] NBD-URI | [ CMD ARGS ... ]

Other options:

    pynbd info --help
    pynbd info --version

Examples:

    pynbd info nbd://localhost
    pynbd info "nbd+unix:///?socket=/tmp/unixsock"
    pynbd info --size nbd://example.com
    pynbd info --can connect nbd://example.com
    pynbd info --is read-only nbd://example.com
    pynbd info --map nbd://example.com
    pynbd info --json nbd://example.com
    pynbd info --list nbd://example.com
    pynbd info --map -- [ qemu-nbd -r -f qcow2 file.qcow2 ]

Please read docs/info.md (or nbdinfo(1)) for full usage.

"""

SHORT_OPTIONS = "LV"
#: nbdinfo 1.14's option table, in its order (``--long-options`` prints it).
LONG_OPTIONS = [
    LongOption("help", NO_ARGUMENT, "help"),
    LongOption("can", REQUIRED_ARGUMENT, "can"),
    LongOption("color", NO_ARGUMENT, "colour"),
    LongOption("colors", NO_ARGUMENT, "colour"),
    LongOption("colour", NO_ARGUMENT, "colour"),
    LongOption("colours", NO_ARGUMENT, "colour"),
    LongOption("no-color", NO_ARGUMENT, "no-colour"),
    LongOption("no-colors", NO_ARGUMENT, "no-colour"),
    LongOption("no-colour", NO_ARGUMENT, "no-colour"),
    LongOption("no-colours", NO_ARGUMENT, "no-colour"),
    LongOption("content", NO_ARGUMENT, "content"),
    LongOption("no-content", NO_ARGUMENT, "no-content"),
    LongOption("is", REQUIRED_ARGUMENT, "can"),
    LongOption("json", NO_ARGUMENT, "json"),
    LongOption("list", NO_ARGUMENT, "L"),
    LongOption("long-options", NO_ARGUMENT, "long-options"),
    LongOption("map", OPTIONAL_ARGUMENT, "map"),
    LongOption("short-options", NO_ARGUMENT, "short-options"),
    LongOption("size", NO_ARGUMENT, "size"),
    LongOption("total", NO_ARGUMENT, "totals"),
    LongOption("totals", NO_ARGUMENT, "totals"),
    LongOption("version", NO_ARGUMENT, "V"),
]


class _Info(ShowExport, ShowMap):
    """One run of the command: the parsed options, the handle and the spooled output."""

    def __init__(self) -> None:
        self.colour = sys.stdout.isatty()
        self.list_all = False
        self.probe_content = False
        self.json_output = False
        self.can: str | None = None
        self.map: str | None = None
        self.size_only = False
        self.totals = False
        self.args: list[str] = []
        self.square_bracket = False
        self.out: list[str] = []
        self.can_exit_code = 0
        self.exports: list[tuple[str, str]] = []
        self.h: nbd.NBD | None = None

    # ------------------------------------------------------------------ command line
    def parse(self, argv: list[str]) -> int | None:
        """Parse the command line; returns an exit status when it is all done already."""
        try:
            opts, operands = getopt_long(argv, SHORT_OPTIONS, LONG_OPTIONS)
        except GetoptError as e:
            fail(f"{e}. Try '{PROG} --help'.")
        content: set[str] = set()
        for key, value in opts:
            if print_listing(key, USAGE, LONG_OPTIONS, SHORT_OPTIONS):
                return 0
            if key == "V":
                h = nbd.NBD()
                print(f"{PROG} {__version__}")
                print(f"{h.get_package_name()} {h.get_version()}")
                h.close()
                return 0
            self._option(key, value, content)
        self._operands(operands)
        if (self.list_all + (self.can is not None) + (self.map is not None) + self.size_only) > 1:
            fail("you cannot use --list, --map and --size together.")
        if len(content) == 2:
            fail("you cannot use --content and --no-content together.")
        if self.totals and self.map is None:
            fail("you must use --totals only with --map option.")
        self.probe_content = not self.list_all
        if "content" in content:
            self.probe_content = True
        if "no-content" in content:
            self.probe_content = False
        if self.can is not None or self.map is not None:
            self.probe_content = False
        return None

    def _option(self, key: str, value: str | None, content: set[str]) -> None:
        if key == "json":
            self.json_output = True
        elif key in ("colour", "no-colour"):
            self.colour = key == "colour"
        elif key in ("content", "no-content"):
            content.add(key)
        elif key == "can":
            self.can = value
        elif key == "map":
            self.map = value if value is not None else "base:allocation"
        elif key == "size":
            self.size_only = True
        elif key == "totals":
            self.totals = True
        elif key == "L":
            self.list_all = True

    def _operands(self, operands: list[str]) -> None:
        """A URI, or a subprocess between separate "[" and "]" words."""
        if len(operands) >= 3 and operands[0] == "[" and operands[-1] == "]":
            self.square_bracket = True
            self.args = operands[1:-1]
        elif len(operands) == 1:
            self.args = operands
        elif not operands:
            fail(f"missing NBD-URI or [ CMD ARGS ... ]. Try '{PROG} --help'.")
        else:
            fail(f"expected one NBD-URI or [ CMD ARGS ... ], got {len(operands)} "
                 f"arguments: {' '.join(operands)}. Try '{PROG} --help'.")

    # ------------------------------------------------------------------ connecting
    def do_connect(self, h: nbd.NBD) -> None:
        try:
            if self.square_bracket:
                h.connect_systemd_socket_activation(self.args)
            else:
                h.connect_uri(self.args[0])
        except nbd.Error as e:
            nbd_fail(e)

    def run(self) -> int:
        h = self.h = nbd.NBD()
        h.set_uri_allow_local_file(True)  # allow ?tls-psk-file
        if self.can is None and self.map is None and not self.size_only:
            h.set_opt_mode(True)
            h.set_full_info(True)
        if self.map is not None:
            try:
                h.add_meta_context(self.map)
            except nbd.Error as e:
                nbd_fail(e)
        self.do_connect(h)
        if self.list_all:
            self.collect_exports()
        list_okay = True
        if self.size_only:
            self.do_size()
        elif self.can is not None:
            self.do_can()
        elif self.map is not None:
            self.do_map()
        else:
            list_okay = self.show_all(h)
        try_(h.opt_abort, None)
        try_(lambda: h.shutdown(0), None)
        self.close()
        _write_stdout("".join(self.out))
        if self.can is not None:
            return self.can_exit_code
        return 0 if list_okay else 1

    def show_all(self, h: nbd.NBD) -> bool:
        """The default mode and --list: the protocol line, then the export(s)."""
        protocol = try_(h.get_protocol, None)
        tls: int = try_(lambda: int(h.get_tls_negotiated()), -1)
        sr: int = try_(lambda: int(h.get_structured_replies_negotiated()), -1)
        if not self.json_output:
            if protocol:
                self.ansi_colour(FG_GREY)
                self.w(f"protocol: {protocol}")
                if tls >= 0:
                    self.w(f" {'with' if tls else 'without'} TLS")
                if sr >= 0:
                    self.w(f", using {'structured' if sr else 'simple'} packets")
                self.w("\n")
                self.ansi_restore()
        else:
            self.w("{\n")
            if protocol:
                self.w(f'"protocol": {json_string(protocol)},\n')
            if tls >= 0:
                self.w(f'"TLS": {tf(tls)},\n')
            if sr >= 0:
                self.w(f'"structured": {tf(sr)},\n')
        okay = self.show_one_export(h, None, True, True) if not self.list_all else \
            self.list_all_exports()
        if self.json_output:
            self.w("}\n")
        return okay

    def close(self) -> None:
        if self.h is not None:
            try_(self.h.close, None)
            self.h = None

    # ------------------------------------------------------------------ --size
    def do_size(self) -> None:
        assert self.h is not None
        try:
            size = self.h.get_size()
        except nbd.Error as e:
            nbd_fail(e)
        self.w(f"{size}\n")

    # ------------------------------------------------------------------ --is / --can
    def do_can(self) -> None:
        h = self.h
        assert h is not None and self.can is not None
        name = self.can.lower()
        getter = _CAN_GETTERS.get(name)
        if getter is None:
            fail(f"unknown --can or --is option: {self.can}")
        try:
            feature = bool(getter(h))
        except nbd.Error as e:
            nbd_fail(e)
        self.can_exit_code = 0 if feature else EXIT_FALSE

    # ------------------------------------------------------------------ --list
    def collect_exports(self) -> None:
        h = self.h
        assert h is not None

        def collect(name: str, desc: str) -> int:
            self.exports.append((name, desc))
            return 0

        try:
            h.opt_list(collect)
        except nbd.Error as e:
            nbd_fail(e)
        if self.probe_content:
            # Leave the server alone while we connect once per export (it may serialize
            # connections); errors do not matter here.
            try_(h.opt_abort, None)

    def list_all_exports(self) -> bool:
        h = self.h
        assert h is not None
        list_okay = True
        if not self.exports and self.json_output:
            self.w('"exports": []\n')
        for i, (name, desc) in enumerate(self.exports):
            if self.probe_content:
                h2 = nbd.NBD()
                h2.set_uri_allow_local_file(True)
                h2.set_opt_mode(True)
                h2.set_full_info(True)
                try:
                    self.do_connect(h2)
                    try:
                        h2.set_export_name(name)
                    except nbd.Error as e:
                        nbd_fail(e)
                    if not self.show_one_export(h2, desc, i == 0, i + 1 == len(self.exports)):
                        list_okay = False
                finally:
                    try_(functools.partial(h2.shutdown, 0), None)
                    try_(h2.close, None)
            else:
                try:
                    h.set_export_name(name)
                except nbd.Error as e:
                    nbd_fail(e)
                if not self.show_one_export(h, desc, i == 0, i + 1 == len(self.exports)):
                    list_okay = False
        return list_okay

def _not_read_only(h: nbd.NBD) -> bool:
    return not h.is_read_only()


#: --is/--can names (compared without case) and the call that answers each.
_CAN_TABLE: list[tuple[tuple[str, ...], Callable[[nbd.NBD], Any]]] = [
    (("connect", "read"), lambda h: True),
    (("tls",), lambda h: h.get_tls_negotiated()),
    (("sr", "structured", "structured reply", "structured-reply", "structured_reply",
      "structured replies", "structured-replies", "structured_replies"),
     lambda h: h.get_structured_replies_negotiated()),
    (("readonly", "read-only", "read_only"), lambda h: h.is_read_only()),
    (("write",), _not_read_only),
    (("rotational",), lambda h: h.is_rotational()),
    (("cache",), lambda h: h.can_cache()),
    (("df",), lambda h: h.can_df()),
    (("fastzero", "fast-zero", "fast_zero"), lambda h: h.can_fast_zero()),
    (("flush",), lambda h: h.can_flush()),
    (("fua",), lambda h: h.can_fua()),
    (("multiconn", "multi-conn", "multi_conn"), lambda h: h.can_multi_conn()),
    (("trim",), lambda h: h.can_trim()),
    (("zero",), lambda h: h.can_zero()),
]

_CAN_GETTERS = {name: getter for names, getter in _CAN_TABLE for name in names}


def _write_stdout(text: str) -> None:
    data = text.encode("utf-8", "surrogateescape")
    try:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    except AttributeError:  # a stdout without .buffer (tests replacing it)
        sys.stdout.write(text)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Run ``pynbd info ARGS``; returns the exit status (0, 1, or 2 for --is/--can false)."""
    from pynbd.tools import _lifetime

    # A server started for [ CMD ] dies with this process; Ctrl-C kills at once, as nbdinfo
    # (a KeyboardInterrupt raised inside a library call could wait out a held reply).
    with _lifetime.tool(default_sigint=True):
        return _main(sys.argv[1:] if argv is None else list(argv))


def _main(args: list[str]) -> int:
    info = _Info()
    try:
        status = info.parse(args)
        if status is not None:
            return status
        return info.run()
    except Exit as e:
        info.close()
        if e.message:
            print(e.message, file=sys.stderr)
        return e.status
    except nbd.Error as e:  # a library call nbdinfo does not expect to fail
        info.close()
        print(f"{PROG}: {e.string}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # As nbdinfo: killed by SIGINT, at once (closing politely could wait for a reply
        # that does not come); a server started for [ CMD ] gets SIGTERM from the kernel.
        import signal

        from pynbd.tools._lifetime import die_of

        die_of(signal.SIGINT)
    except BrokenPipeError:
        info.close()
        return 1
