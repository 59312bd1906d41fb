"""``pynbd info``'s account of one export (nbdinfo's show.c): what the export is, gathered
with nbdinfo's calls in nbdinfo's order, then printed as text or JSON."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

from pynbd import libnbd as nbd
from pynbd.tools._info_output import (
    FG_BOLD_BLACK,
    FG_GREEN,
    FG_GREY,
    FG_RED,
    PROG,
    Output,
    fail,
    human_size,
    json_string,
    nbd_fail,
    tf,
    try_,
)

__all__ = ["CONTENT_PROBE_BYTES", "ExportFacts", "ShowExport"]


def _as_int(get: Callable[[nbd.NBD], bool], h: nbd.NBD) -> int:
    return int(get(h))

#: nbdinfo reads this much from the start of an export for file(1) (``buf[8192]`` in show.c).
CONTENT_PROBE_BYTES = 8192

#: The flags shown, in nbdinfo's order, and the call that answers each.
_FLAGS: list[tuple[str, Callable[[nbd.NBD], bool]]] = [
    ("is_rotational", lambda h: h.is_rotational()),
    ("is_read_only", lambda h: h.is_read_only()),
    ("can_cache", lambda h: h.can_cache()),
    ("can_df", lambda h: h.can_df()),
    ("can_fast_zero", lambda h: h.can_fast_zero()),
    ("can_flush", lambda h: h.can_flush()),
    ("can_fua", lambda h: h.can_fua()),
    ("can_multi_conn", lambda h: h.can_multi_conn()),
    ("can_trim", lambda h: h.can_trim()),
    ("can_zero", lambda h: h.can_zero()),
]
_BLOCK_SIZES = [("block_size_minimum", nbd.SIZE_MINIMUM),
                ("block_size_preferred", nbd.SIZE_PREFERRED),
                ("block_size_maximum", nbd.SIZE_MAXIMUM)]


class ExportFacts:
    """What one export is, as nbdinfo gathers it (-1 where a call failed)."""

    __slots__ = ("block_sizes", "content", "contexts", "desc", "flags", "name", "show_context",
                 "size", "uri")

    def __init__(self) -> None:
        self.size = 0
        self.uri: str | None = None
        self.name = ""
        self.desc: str | None = None
        self.flags: list[tuple[str, int]] = []
        self.block_sizes: list[tuple[str, int]] = []
        self.contexts: list[str] = []
        self.show_context = False
        self.content: str | None = None


class ShowExport(Output):
    """The default mode's (and --list's) output for one export."""

    list_all: bool
    probe_content: bool
    square_bracket: bool
    json_output: bool

    def show_one_export(self, h: nbd.NBD, desc: str | None, first: bool, last: bool) -> bool:
        """Print one export; False if it could not be opened (said on stderr)."""
        if not self._open_export(h):
            return False
        facts = self._gather(h, desc)
        if self.json_output:
            self._json_export(facts, first, last)
        else:
            self._text_export(facts)
        return True

    def _open_export(self, h: nbd.NBD) -> bool:
        """opt_info if it works; otherwise (oldstyle, servers without NBD_OPT_INFO) go all
        the way with opt_go. A failure here is reported and the list goes on."""
        if not h.aio_is_negotiating():
            return True
        try:
            h.opt_info()
        except nbd.Error:
            try:
                h.opt_go()
            except nbd.Error as e:
                msg = f"{PROG}: {e.string}"
                export = try_(h.get_export_name, None)
                if export is not None:
                    msg += " for the default export" if export == "" else \
                        f" for export: {export}"
                print(msg, file=sys.stderr)
                if not self.list_all:
                    print(f"{PROG}: suggestion: to list all exports on the server, "
                          "use --list", file=sys.stderr)
                return False
        return True

    def _gather(self, h: nbd.NBD, desc: str | None) -> ExportFacts:
        """nbdinfo's calls, in its order; the content last (it leaves negotiation)."""
        f = ExportFacts()
        try:
            f.size = h.get_size()
        except nbd.Error as e:
            nbd_fail(e)
        f.uri = None if self.square_bracket else try_(h.get_uri, None)
        # Prefer the server's version of the name, if available.
        name = try_(h.get_canonical_export_name, None)
        if name is None:
            try:
                name = h.get_export_name()
            except nbd.Error as e:
                nbd_fail(e)
        f.name = name
        f.desc = desc if desc is not None else try_(h.get_export_description, None)
        f.flags = [(key, try_(functools.partial(_as_int, get, h), -1)) for key, get in _FLAGS]
        f.block_sizes = [(key, try_(functools.partial(h.get_block_size, t), -1))
                         for key, t in _BLOCK_SIZES]

        def collect_context(name: str) -> int:
            f.contexts.append(name)
            return 0

        f.show_context = try_(lambda: (h.opt_list_meta_context(collect_context), True)[1],
                              False)
        f.content = self.get_content(h, f.size)
        return f

    def _text_export(self, f: ExportFacts) -> None:
        size_str, human_flag = human_size(f.size)
        self.ansi_colour(FG_BOLD_BLACK)
        self.w(f"export={json_string(f.name)}:\n")
        if f.desc:
            self.w(f"\tdescription: {f.desc}\n")
        self.w(f"\texport-size: {f.size} ({size_str})\n" if human_flag else
               f"\texport-size: {f.size}\n")
        if f.content is not None:
            self.w(f"\tcontent: {f.content}\n")
        if f.uri is not None:
            self.w(f"\turi: {f.uri}\n")
        self.ansi_restore()
        self.ansi_colour(FG_GREY)
        if f.show_context:
            self.w("\tcontexts:\n")
            for c in f.contexts:
                self.w(f"\t\t{c}\n")
        (_, is_rotational), (_, is_read_only) = f.flags[0], f.flags[1]
        if is_rotational >= 0:
            self.w(f"\tis_rotational: {tf(is_rotational)}\n")
        self.ansi_restore()
        if is_read_only >= 0:
            self.w(f"\tis_read_only: {tf(is_read_only)}\n")
        for name, value in f.flags[2:]:
            if value >= 0:
                self.ansi_colour(FG_GREEN if value else FG_RED)
                self.w(f"\t{name}: {tf(value)}\n")
                self.ansi_restore()
        for name, value in f.block_sizes:
            if value > 0:
                self.w(f"\t{name}: {value}\n")

    def _json_export(self, f: ExportFacts, first: bool, last: bool) -> None:
        size_str, _ = human_size(f.size)
        if first:
            self.w('"exports": [\n')
        self.w("\t{\n")
        self.w(f'\t"export-name": {json_string(f.name)},\n')
        if f.desc:
            self.w(f'\t"description": {json_string(f.desc)},\n')
        if f.content is not None:
            self.w(f'\t"content": {json_string(f.content)},\n')
        if f.uri is not None:
            self.w(f'\t"uri": {json_string(f.uri)},\n')
        if f.show_context:
            self.w('\t"contexts": [\n')
            for i, c in enumerate(f.contexts):
                self.w(f"\t\t{json_string(c)}{',' if i + 1 != len(f.contexts) else ''}\n")
            self.w("\t],\n")
        for name, value in f.flags:
            if value >= 0:
                self.w(f'\t"{name}": {tf(value)},\n')
        for name, value in f.block_sizes:
            if value > 0:
                self.w(f'\t"{name}": {value},\n')
        # Last because of JSON's commas.
        self.w(f'\t"export-size": {f.size},\n')
        self.w(f'\t"export-size-str": "{size_str}"\n')
        self.w("\t} ]\n" if last else "\t},\n")

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
                nbd_fail(e)
        n = min(size, CONTENT_PROBE_BYTES)
        try:
            fd, path = tempfile.mkstemp(dir="/tmp" if os.path.isdir("/tmp") else None)
        except OSError as e:
            fail(f"mkstemp: {e.strerror or e}")
        try:
            try:
                data = bytes(h.pread(n, 0)) if n else b""
            except nbd.Error:
                return None
            try:
                os.write(fd, data)
            except OSError as e:
                fail(f"write: {e.strerror or e}")
            os.close(fd)
            fd = -1
            return _file_b(path)
        finally:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass


def _file_b(path: str) -> str | None:
    """The first line of ``file -b PATH``, run as nbdinfo runs it, through popen(3) and so
    /bin/sh (a missing file(1) gets the shell's own message on stderr); None if nothing."""
    try:
        proc = subprocess.run(["sh", "-c", f"file -b {path}"], executable="/bin/sh",
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, check=False)
    except OSError:
        return None
    if not proc.stdout:
        return None
    return proc.stdout.split(b"\n", 1)[0].decode("utf-8", "surrogateescape")

