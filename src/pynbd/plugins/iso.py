"""The iso plugin: directories served as an ISO 9660 (CD-ROM) image made by xorriso,
genisoimage or mkisofs. Its manual page is :class:`IsoPlugin`'s docstring."""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.plugin import CacheMode, Plugin, ThreadModel
from pynbd.plugins._filesystems_common import large_tmpdir, log, read_fully, realpath, run_tool

__all__ = ["ISO_PROGRAMS", "IsoPlugin"]

#: The programs tried, in this order, when prog= is not given.
ISO_PROGRAMS = ("xorriso", "genisoimage", "mkisofs")


def default_program() -> str:
    """The first of :data:`ISO_PROGRAMS` on $PATH (xorriso when there is none: the error
    then names it)."""
    for prog in ISO_PROGRAMS:
        if shutil.which(prog):
            return prog
    return ISO_PROGRAMS[0]


def iso_command(prog: str, params: str | None, dirs: list[str]) -> str:
    """The shell command that writes the ISO to standard output: ``PROG [-as mkisofs]
    -quiet PARAMS DIR...`` (xorriso needs -as mkisofs to take mkisofs's options; PARAMS is
    shell text, as in nbdkit)."""
    words = [shlex.quote(prog)]
    if os.path.basename(prog) == "xorriso":
        words.append("-as mkisofs")
    words.append("-quiet")
    if params:
        words.append(params)
    words += [shlex.quote(d) for d in dirs]
    return " ".join(words)


class IsoPlugin(Plugin):
    """NAME
        iso - pynbd plugin making a virtual ISO 9660 (CD-ROM) image from directories

    SYNOPSIS
        pynbd serve iso [dir=]DIRECTORY [[dir=]DIRECTORY ...] [prog=mkisofs]
                        [params='-JrT']

    DESCRIPTION
        iso serves, read-only, an ISO 9660 image of the files in one or more directories
        (merged when there are several). The image is made once, when the server starts,
        by xorriso(1), genisoimage(1) or mkisofs(1), written to a temporary file in $TMPDIR
        (/var/tmp when TMPDIR is not set) that is deleted from the directory at once (the
        server keeps it open). Changes to the directories after that are not seen.

        The command run is

            PROG [-as mkisofs] -quiet PARAMS DIRECTORY... > TEMPORARY-FILE

        through /bin/sh, with "-as mkisofs" when PROG is xorriso (it makes xorriso take
        mkisofs's options). Without extensions (params='-JrT' for Joliet, Rock Ridge and
        TRANS.TBL) names on the disc are cut to ISO 9660's short names.

        Every client sees the same image: multi-conn is advertised. This is
        nbdkit-iso-plugin(1) for pynbd, with the same parameters and messages. Where nbdkit
        chooses its program when it is built, pynbd takes the first of xorriso,
        genisoimage and mkisofs found on $PATH; and where nbdkit 1.32 as Debian builds it
        passes "-as mkisofs" to whatever prog= names (so prog=genisoimage fails there),
        pynbd passes it to xorriso only.

    PARAMETERS
        [dir=]DIRECTORY
            A directory whose files are put in the image (required; may be given more than
            once). "dir=" may be omitted.

        params='PARAMETERS ...'
            More options for the program, for example params='-JrT -V "My Disk"'. They are
            passed through the shell unchecked: quote them with care.

        prog=PROGRAM
            The program that makes the image (on $PATH, or a path).

    ENVIRONMENT
        PATH
            Where the program is looked for.

        TMPDIR
            Where the image is made (default /var/tmp); it needs room for the whole image.

    EXAMPLES
        Serve a directory as a CD with Joliet, Rock Ridge and TRANS.TBL:

            pynbd serve iso /path/to/directory params='-JrT'

        Make the image with genisoimage, with a volume label:

            pynbd serve iso /path/to/directory prog=genisoimage params='-r -V DATA'
    """

    name = "iso"
    version = "1.0"
    magic_config_key = "dir"
    thread_model = ThreadModel.PARALLEL
    config_help = (
        "dir=<DIRECTORY>     (required) The directory to serve.\n"
        "params='<PARAMS>'              Extra parameters to pass.\n"
        "prog=<ISOPROG>                 The program used to make ISOs."
    )

    def __init__(self) -> None:
        self._dirs: list[str] = []
        self._prog: str | None = None
        self._params: str | None = None
        self._fd = -1

    def config(self, key: str, value: str) -> None:
        if key == "dir":
            self._dirs.append(realpath(value, "iso"))
        elif key == "params":
            self._params = value
        elif key == "prog":
            self._prog = value
        else:
            raise ConfigError(f"iso: unknown parameter '{key}'")

    def config_complete(self) -> None:
        if not self._dirs:
            raise ConfigError("iso: you must supply the dir=<DIRECTORY> parameter "
                              "after the plugin name on the command line")

    def get_ready(self) -> None:
        prog = self._prog or default_program()
        command = iso_command(prog, self._params, self._dirs)
        try:
            fd, path = tempfile.mkstemp(prefix="iso", dir=large_tmpdir())
        except OSError as e:
            raise ConfigError(f"iso: mkstemp: {large_tmpdir()}: {e.strerror}") from None
        os.unlink(path)
        log.debug("iso: %s > %s", command, path)
        try:
            run_tool([command], prog, shell=True, stdout=fd)
        except CommandError as e:
            os.close(fd)
            raise ConfigError(f"iso: {e.message}") from None
        self._fd = fd

    def cleanup(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        return None

    def get_size(self, h: Any) -> int:
        return os.fstat(self._fd).st_size

    def can_multi_conn(self, h: Any) -> bool:
        return True

    def can_cache(self, h: Any) -> CacheMode:
        return CacheMode.EMULATE

    def pread_into(self, h: Any, buf: memoryview, offset: int, flags: int) -> None:
        read_fully(self._fd, buf, offset, "iso")
