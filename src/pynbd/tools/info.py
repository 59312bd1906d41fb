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
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

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

__all__ = ["PROG", "human_size", "json_string", "main"]

#: The program name that starts every message, as nbdinfo's argv[0].
PROG = "pynbd info"

#: nbdinfo reads this much from the start of an export for file(1) (``buf[8192]`` in show.c).
CONTENT_PROBE_BYTES = 8192
#: nbdinfo's exit status for "--is/--can: false" (true is 0, an error 1).
EXIT_FALSE = 2

# ANSI colours nbdinfo uses (libnbd common/include/ansi-colours.h).
_FG_BOLD_BLACK = "1;30"
_FG_GREEN = "22;32"
_FG_GREY = "22;90"
_FG_RED = "22;31"
_FG_BRIGHT_WHITE = "1;37"
_BG_BLACK = "40"
_BG_LIGHT_GREY = "47"

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

_T = TypeVar("_T")


class _Exit(Exception):
    """Leave main() with `status`, after printing `message` (if any) on stderr."""

    def __init__(self, status: int, message: str | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


def _fail(message: str) -> NoReturn:
    raise _Exit(1, f"{PROG}: {message}")


def _nbd_fail(e: nbd.Error) -> NoReturn:
    # nbdinfo prints nbd_get_error(): the message without Python's "(EINVAL)" suffix.
    _fail(str(e.string))


def _try(call: Callable[[], _T], default: _T) -> _T:
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


class _Info:
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

    # ------------------------------------------------------------------ output helpers
    def w(self, s: str) -> None:
        self.out.append(s)

    def ansi_colour(self, code: str) -> None:
        if self.colour:
            self.out.append(f"\033[{code}m")

    def ansi_restore(self) -> None:
        if self.colour:
            self.out.append("\033[0m")

    # ------------------------------------------------------------------ command line
    def parse(self, argv: list[str]) -> int | None:
        """Parse the command line; returns an exit status when it is all done already."""
        try:
            opts, operands = getopt_long(argv, SHORT_OPTIONS, LONG_OPTIONS)
        except GetoptError as e:
            _fail(f"{e}. Try '{PROG} --help'.")
        content_flag = no_content_flag = False
        for key, value in opts:
            if print_listing(key, USAGE, LONG_OPTIONS, SHORT_OPTIONS):
                return 0
            if key == "V":
                h = nbd.NBD()
                print(f"{PROG} {__version__}")
                print(f"{h.get_package_name()} {h.get_version()}")
                h.close()
                return 0
            if key == "json":
                self.json_output = True
            elif key == "colour":
                self.colour = True
            elif key == "no-colour":
                self.colour = False
            elif key == "content":
                content_flag = True
            elif key == "no-content":
                no_content_flag = True
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

        # A URI, or a subprocess between separate "[" and "]" words.
        if len(operands) >= 3 and operands[0] == "[" and operands[-1] == "]":
            self.square_bracket = True
            self.args = operands[1:-1]
        elif len(operands) == 1:
            self.args = operands
        elif not operands:
            _fail(f"missing NBD-URI or [ CMD ARGS ... ]. Try '{PROG} --help'.")
        else:
            _fail(f"expected one NBD-URI or [ CMD ARGS ... ], got {len(operands)} "
                  f"arguments: {' '.join(operands)}. Try '{PROG} --help'.")

        if (self.list_all + (self.can is not None) + (self.map is not None) + self.size_only) > 1:
            _fail("you cannot use --list, --map and --size together.")
        if content_flag and no_content_flag:
            _fail("you cannot use --content and --no-content together.")
        if self.totals and self.map is None:
            _fail("you must use --totals only with --map option.")

        self.probe_content = not self.list_all
        if content_flag:
            self.probe_content = True
        if no_content_flag:
            self.probe_content = False
        if self.can is not None or self.map is not None:
            self.probe_content = False
        return None

    # ------------------------------------------------------------------ connecting
    def do_connect(self, h: nbd.NBD) -> None:
        try:
            if self.square_bracket:
                h.connect_systemd_socket_activation(self.args)
            else:
                h.connect_uri(self.args[0])
        except nbd.Error as e:
            _nbd_fail(e)

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
                _nbd_fail(e)

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
            protocol = _try(h.get_protocol, None)
            tls: int = _try(lambda: int(h.get_tls_negotiated()), -1)
            sr: int = _try(lambda: int(h.get_structured_replies_negotiated()), -1)
            if not self.json_output:
                if protocol:
                    self.ansi_colour(_FG_GREY)
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
                    self.w(f'"TLS": {_tf(tls)},\n')
                if sr >= 0:
                    self.w(f'"structured": {_tf(sr)},\n')

            if not self.list_all:
                list_okay = self.show_one_export(h, None, True, True)
            else:
                list_okay = self.list_all_exports()

            if self.json_output:
                self.w("}\n")

        _try(h.opt_abort, None)
        _try(lambda: h.shutdown(0), None)
        self.close()

        _write_stdout("".join(self.out))
        if self.can is not None:
            return self.can_exit_code
        return 0 if list_okay else 1

    def close(self) -> None:
        if self.h is not None:
            _try(self.h.close, None)
            self.h = None

    # ------------------------------------------------------------------ --size
    def do_size(self) -> None:
        assert self.h is not None
        try:
            size = self.h.get_size()
        except nbd.Error as e:
            _nbd_fail(e)
        self.w(f"{size}\n")

    # ------------------------------------------------------------------ --is / --can
    def do_can(self) -> None:
        h = self.h
        assert h is not None and self.can is not None
        name = self.can.lower()
        getter = _CAN_GETTERS.get(name)
        if getter is None:
            _fail(f"unknown --can or --is option: {self.can}")
        try:
            feature = bool(getter(h))
        except nbd.Error as e:
            _nbd_fail(e)
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
            _nbd_fail(e)
        if self.probe_content:
            # Leave the server alone while we connect once per export (it may serialize
            # connections); errors do not matter here.
            _try(h.opt_abort, None)

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
                        _nbd_fail(e)
                    if not self.show_one_export(h2, desc, i == 0, i + 1 == len(self.exports)):
                        list_okay = False
                finally:
                    _try(functools.partial(h2.shutdown, 0), None)
                    _try(h2.close, None)
            else:
                try:
                    h.set_export_name(name)
                except nbd.Error as e:
                    _nbd_fail(e)
                if not self.show_one_export(h, desc, i == 0, i + 1 == len(self.exports)):
                    list_okay = False
        return list_okay

    # ------------------------------------------------------------------ one export
    def show_one_export(self, h: nbd.NBD, desc: str | None, first: bool, last: bool) -> bool:
        # opt_info if it works; otherwise (oldstyle, servers without NBD_OPT_INFO) go all
        # the way with opt_go. A failure here is reported and the list goes on.
        if h.aio_is_negotiating():
            try:
                h.opt_info()
            except nbd.Error:
                try:
                    h.opt_go()
                except nbd.Error as e:
                    msg = f"{PROG}: {e.string}"
                    export = _try(h.get_export_name, None)
                    if export is not None:
                        msg += " for the default export" if export == "" else \
                            f" for export: {export}"
                    print(msg, file=sys.stderr)
                    if not self.list_all:
                        print(f"{PROG}: suggestion: to list all exports on the server, "
                              "use --list", file=sys.stderr)
                    return False
        try:
            size = h.get_size()
        except nbd.Error as e:
            _nbd_fail(e)
        size_str, human_flag = human_size(size)

        uri = None if self.square_bracket else _try(h.get_uri, None)

        # Prefer the server's version of the name, if available.
        export_name = _try(h.get_canonical_export_name, None)
        if export_name is None:
            try:
                export_name = h.get_export_name()
            except nbd.Error as e:
                _nbd_fail(e)
        if desc is None:
            desc = _try(h.get_export_description, None)

        def flag(getter: Callable[[], bool]) -> int:
            return _try(lambda: int(getter()), -1)

        is_rotational = flag(h.is_rotational)
        is_read_only = flag(h.is_read_only)
        can_cache = flag(h.can_cache)
        can_df = flag(h.can_df)
        can_fast_zero = flag(h.can_fast_zero)
        can_flush = flag(h.can_flush)
        can_fua = flag(h.can_fua)
        can_multi_conn = flag(h.can_multi_conn)
        can_trim = flag(h.can_trim)
        can_zero = flag(h.can_zero)
        block_minimum = _try(lambda: h.get_block_size(nbd.SIZE_MINIMUM), -1)
        block_preferred = _try(lambda: h.get_block_size(nbd.SIZE_PREFERRED), -1)
        block_maximum = _try(lambda: h.get_block_size(nbd.SIZE_MAXIMUM), -1)
        contexts: list[str] = []

        def collect_context(name: str) -> int:
            contexts.append(name)
            return 0

        show_context = _try(lambda: (h.opt_list_meta_context(collect_context), True)[1], False)

        # Content last: it moves the connection out of negotiation.
        content = self.get_content(h, size)

        booleans = [
            ("is_rotational", is_rotational), ("is_read_only", is_read_only),
            ("can_cache", can_cache), ("can_df", can_df), ("can_fast_zero", can_fast_zero),
            ("can_flush", can_flush), ("can_fua", can_fua), ("can_multi_conn", can_multi_conn),
            ("can_trim", can_trim), ("can_zero", can_zero),
        ]
        block_sizes = [
            ("block_size_minimum", block_minimum), ("block_size_preferred", block_preferred),
            ("block_size_maximum", block_maximum),
        ]

        if not self.json_output:
            self.ansi_colour(_FG_BOLD_BLACK)
            self.w(f"export={json_string(export_name)}:\n")
            if desc:
                self.w(f"\tdescription: {desc}\n")
            if human_flag:
                self.w(f"\texport-size: {size} ({size_str})\n")
            else:
                self.w(f"\texport-size: {size}\n")
            if content is not None:
                self.w(f"\tcontent: {content}\n")
            if uri is not None:
                self.w(f"\turi: {uri}\n")
            self.ansi_restore()
            self.ansi_colour(_FG_GREY)
            if show_context:
                self.w("\tcontexts:\n")
                for c in contexts:
                    self.w(f"\t\t{c}\n")
            if is_rotational >= 0:
                self.w(f"\tis_rotational: {_tf(is_rotational)}\n")
            self.ansi_restore()
            if is_read_only >= 0:
                self.w(f"\tis_read_only: {_tf(is_read_only)}\n")
            for name, value in booleans[2:]:
                if value >= 0:
                    self.ansi_colour(_FG_GREEN if value else _FG_RED)
                    self.w(f"\t{name}: {_tf(value)}\n")
                    self.ansi_restore()
            for name, value in block_sizes:
                if value > 0:
                    self.w(f"\t{name}: {value}\n")
        else:
            if first:
                self.w('"exports": [\n')
            self.w("\t{\n")
            self.w(f'\t"export-name": {json_string(export_name)},\n')
            if desc:
                self.w(f'\t"description": {json_string(desc)},\n')
            if content is not None:
                self.w(f'\t"content": {json_string(content)},\n')
            if uri is not None:
                self.w(f'\t"uri": {json_string(uri)},\n')
            if show_context:
                self.w('\t"contexts": [\n')
                for i, c in enumerate(contexts):
                    self.w(f"\t\t{json_string(c)}{',' if i + 1 != len(contexts) else ''}\n")
                self.w("\t],\n")
            for name, value in booleans:
                if value >= 0:
                    self.w(f'\t"{name}": {_tf(value)},\n')
            for name, value in block_sizes:
                if value > 0:
                    self.w(f'\t"{name}": {value},\n')
            # Last because of JSON's commas.
            self.w(f'\t"export-size": {size},\n')
            self.w(f'\t"export-size-str": "{size_str}"\n')
            self.w("\t} ]\n" if last else "\t},\n")
        return True

    def get_content(self, h: nbd.NBD, size: int) -> str | None:
        """file(1)'s first line about the first 8 KiB of the export, or None.

        Best effort, as nbdinfo: a failed read or a file(1) that prints nothing gives None.
        """
        if not self.probe_content:
            return None
        if h.aio_is_negotiating():
            try:
                h.opt_go()
            except nbd.Error as e:
                _nbd_fail(e)
        n = min(size, CONTENT_PROBE_BYTES)
        try:
            fd, path = tempfile.mkstemp(dir="/tmp" if os.path.isdir("/tmp") else None)
        except OSError as e:
            _fail(f"mkstemp: {e.strerror or e}")
        try:
            try:
                data = bytes(h.pread(n, 0)) if n else b""
            except nbd.Error:
                return None
            try:
                os.write(fd, data)
            except OSError as e:
                _fail(f"write: {e.strerror or e}")
            os.close(fd)
            fd = -1
            # nbdinfo runs "file -b TEMPFILE" through popen(3), so through /bin/sh: a
            # missing file(1) gets the shell's own message on stderr.
            try:
                proc = subprocess.run(["sh", "-c", f"file -b {path}"], executable="/bin/sh",
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      check=False)
            except OSError:
                return None
            if not proc.stdout:
                return None
            return proc.stdout.split(b"\n", 1)[0].decode("utf-8", "surrogateescape")
        finally:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass

    # ------------------------------------------------------------------ --map
    def do_map(self) -> None:
        h = self.h
        assert h is not None and self.map is not None
        mapname = self.map
        if not _try(lambda: h.can_meta_context(mapname), True):
            _fail(f'--map: server does not support metadata context "{mapname}"')
        align = _try(lambda: h.get_block_size(nbd.SIZE_MINIMUM), 0) or 512
        max_len = (1 << 32) - align  # UINT32_MAX - align + 1: whole aligned blocks
        try:
            size = h.get_size()
        except nbd.Error as e:
            _nbd_fail(e)

        entries: list[int] = []

        def extent(metacontext: str, offset: int, ents: list[int], err: Any) -> int:
            if metacontext == mapname:
                entries.extend(ents)
            return 0

        offset = 0
        while offset < size:
            prev = len(entries)
            try:
                h.block_status(min(size - offset, max_len), offset, extent, 0)
            except nbd.Error as e:
                _nbd_fail(e)
            if prev == len(entries):
                _fail("--map: server did not return any extents")
            offset += sum(entries[prev::2])

        pairs = list(zip(entries[0::2], entries[1::2], strict=True))
        if not self.totals:
            self.print_extents(pairs)
        else:
            self.print_totals(pairs, size)

    def print_extents(self, pairs: list[tuple[int, int]]) -> None:
        # Adjacent extents of the same type are printed as one.
        merged: list[list[int]] = []
        for length, typ in pairs:
            if merged and merged[-1][1] == typ:
                merged[-1][0] += length
            else:
                merged.append([length, typ])
        if self.json_output:
            self.w("[\n")
        offset = 0
        for i, (length, typ) in enumerate(merged):
            descr, fg, bg = _extent_description(self.map or "", typ)
            if not self.json_output:
                self._map_line(f"{offset:10d}  {length:10d}  {typ:3d}", "  ", descr, fg, bg)
            else:
                if i:
                    self.w(",\n")
                self.w(f'{{ "offset": {offset}, "length": {length}, "type": {typ}')
                if descr is not None:
                    self.w(f', "description": {json_string(descr)}')
                self.w("}")
            offset += length
        if self.json_output:
            self.w("\n]\n")

    def _map_line(self, text: str, sep: str, descr: str | None, fg: str | None,
                  bg: str | None) -> None:
        """One line of the text map or totals, in the type's colours."""
        if fg:
            self.ansi_colour(fg)
        if bg:
            self.ansi_colour(bg)
        self.w(text)
        if descr is not None:
            self.w(f"{sep}{descr}")
        if fg or bg:
            self.ansi_restore()
        self.w("\n")

    def print_totals(self, pairs: list[tuple[int, int]], size: int) -> None:
        if size == 0:
            if self.json_output:
                self.w("[]\n")
            return
        if self.json_output:
            self.w("[\n")
        totals: dict[int, int] = {}
        for length, typ in pairs:
            totals[typ] = totals.get(typ, 0) + length
        comma = False
        for typ in sorted(totals):
            c = totals[typ]
            if c == 0:
                continue
            percent = 100.0 * c / size
            descr, fg, bg = _extent_description(self.map or "", typ)
            if not self.json_output:
                self._map_line(f"{c:10d} {percent:5.1f}% {typ:3d}", " ", descr, fg, bg)
            else:
                if comma:
                    self.w(",\n")
                self.w(f'{{ "size": {c}, "percent": {_fmt_g(percent)}, "type": {typ}')
                if descr is not None:
                    self.w(f', "description": {json_string(descr)}')
                self.w(" }")
                comma = True
        if self.json_output:
            self.w("\n]\n")


def _tf(v: int) -> str:
    return "true" if v else "false"


def _fmt_g(x: float) -> str:
    """C's ``%g``."""
    return f"{x:g}"


def _extent_description(metacontext: str, typ: int) -> tuple[str | None, str | None, str | None]:
    """nbdinfo's (description, foreground, background) of extent type `typ`."""
    if metacontext == "base:allocation":
        if typ == 0:
            return "data", _FG_BOLD_BLACK, None
        if typ in (1, 2, 3):
            return ("hole", "zero", "hole,zero")[typ - 1], None, None
    elif metacontext.startswith("qemu:dirty-bitmap:"):
        if typ == 0:
            return "clean", _FG_GREEN, None
        if typ == 1:
            return "dirty", _FG_RED, None
    elif metacontext == "qemu:allocation-depth":
        if typ == 0:
            return "absent", None, None
        if typ == 1:
            return "local", _FG_BRIGHT_WHITE, _BG_BLACK
        return f"backing depth {typ}", None, _BG_LIGHT_GREY
    return None, None, None


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

    with _lifetime.tool():  # a server started for [ CMD ] dies with this process
        return _main(sys.argv[1:] if argv is None else list(argv))


def _main(args: list[str]) -> int:
    info = _Info()
    try:
        status = info.parse(args)
        if status is not None:
            return status
        return info.run()
    except _Exit as e:
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
