"""The eval plugin: an export served by shell fragments given on the command line, nbdkit's
calling convention exactly. Its manual page is :class:`EvalPlugin`'s docstring."""

from __future__ import annotations

import os

from pynbd.errors import ConfigError
from pynbd.plugins._shell import ShellPlugin, Status

__all__ = ["EvalPlugin"]

#: The keys that define a method (everything else goes to the config method).
METHODS = frozenset({
    "after_fork", "block_size", "cache", "can_cache", "can_extents", "can_fast_zero",
    "can_flush", "can_fua", "can_multi_conn", "can_trim", "can_write", "can_zero", "close",
    "config", "config_complete", "default_export", "dump_plugin", "export_description",
    "extents", "flush", "get_ready", "get_size", "is_rotational", "list_exports", "missing",
    "open", "pread", "preconnect", "pwrite", "thread_model", "trim", "unload", "zero",
})

#: can_* methods written for a script that defines the method they guard but not them.
_IMPLIED = (("pwrite", "can_write", "exit 0\n"), ("flush", "can_flush", "exit 0\n"),
            ("trim", "can_trim", "exit 0\n"), ("zero", "can_zero", "exit 0\n"),
            ("extents", "can_extents", "exit 0\n"), ("cache", "can_cache", "echo native\n"))


class EvalPlugin(ShellPlugin):
    """NAME
        eval - pynbd plugin written as shell fragments on the command line

    SYNOPSIS
        pynbd serve eval get_size='SCRIPT' pread='SCRIPT' pwrite='SCRIPT' [...]

    DESCRIPTION
        eval serves an export answered by fragments of shell script, one per method,
        given on the command line. It is the sh plugin with the script cut into pieces:
        read the sh plugin's manual page (pynbd serve sh --help) first; the arguments,
        exit statuses, errors on stderr and $tmpdir are the same. The differences:

        - Each METHOD='SCRIPT' is written to $tmpdir/METHOD and run by /bin/sh as
          "$tmpdir/METHOD METHOD ARGS...".

        - A method not given runs the "missing" script, by default "exit 2".

        - The can_* methods follow from what is given, as for plugins in other languages:
          with pwrite, flush, trim, zero or extents and no can_write, can_flush, can_trim,
          can_zero or can_extents, that method answers true; with cache and no can_cache,
          native.

        - There is no load method, and no magic parameter: every parameter is KEY=VALUE.

        This is nbdkit-eval-plugin(1) for pynbd; the command lines are the same.

    PARAMETERS
        after_fork=SCRIPT       block_size=SCRIPT       cache=SCRIPT
        can_cache=SCRIPT        can_extents=SCRIPT      can_fast_zero=SCRIPT
        can_flush=SCRIPT        can_fua=SCRIPT          can_multi_conn=SCRIPT
        can_trim=SCRIPT         can_write=SCRIPT        can_zero=SCRIPT
        close=SCRIPT            config=SCRIPT           config_complete=SCRIPT
        default_export=SCRIPT   dump_plugin=SCRIPT      export_description=SCRIPT
        extents=SCRIPT          flush=SCRIPT            get_ready=SCRIPT
        get_size=SCRIPT         is_rotational=SCRIPT    list_exports=SCRIPT
        open=SCRIPT             pread=SCRIPT            preconnect=SCRIPT
        pwrite=SCRIPT           thread_model=SCRIPT     trim=SCRIPT
        unload=SCRIPT           zero=SCRIPT
            The script of each method (each at most once). All are optional; quote them
            for your shell ('...').

        missing=SCRIPT
            Runs in place of every method not given. The default is "exit 2".

        KEY=VALUE
            Any other key goes, in command-line order, to the config script as
            "config KEY VALUE"; without one it is an error. A future method of the same
            name would take the key over.

    EXAMPLES
        A 64M read-only disk of zeroes:

            pynbd serve eval get_size='echo 64M' \\
                             pread='dd if=/dev/zero count=$3 iflag=count_bytes'

        A file served the slow way (the file plugin without its features):

            pynbd serve eval \\
              config='ln -sf "$(realpath "$3")" $tmpdir/file' \\
              get_size='stat -Lc %s $tmpdir/file' \\
              pread='dd if=$tmpdir/file skip=$4 count=$3 iflag=count_bytes,skip_bytes' \\
              pwrite='dd of=$tmpdir/file seek=$4 conv=notrunc oflag=seek_bytes' \\
              file=disk.img
    """

    name = "eval"
    config_help = "get_size=' SCRIPT '\npread=' SCRIPT '\n[etc]"
    tmpdir_prefix = "pynbdeval"

    def __init__(self) -> None:
        super().__init__()
        self._methods: dict[str, str] = {}
        self._missing = ""

    def script(self, method: str) -> str:
        return self._methods.get(method, self._missing)

    def _write(self, method: str, text: str) -> str:
        """Save a method's script as $tmpdir/METHOD (mode 0500, run by /bin/sh)."""
        path = os.path.join(self.tmpdir, method)
        try:
            if os.path.lexists(path):
                os.unlink(path)
            with open(path, "wb") as f:
                f.write(os.fsencode(text))
                os.fchmod(f.fileno(), 0o500)
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror}") from None
        return path

    def load(self) -> None:
        super().load()
        self._missing = self._write("missing", "exit 2\n")

    def config(self, key: str, value: str) -> None:
        if key in METHODS:
            if key in self._methods:
                raise ConfigError(f"method {key} defined more than once on the command line")
            path = self._write(key, value)
            self._methods[key] = path
            if key == "missing":
                self._missing = path
            return
        status, _ = self.config_call("config", key, value)
        if status == Status.MISSING:
            raise ConfigError(f"{self.script('config')}: callback '{key}' is unknown, and "
                              "there is no 'config' callback to handle it")

    def config_complete(self) -> None:
        for method, can, text in _IMPLIED:
            if method in self._methods and can not in self._methods:
                self._methods[can] = self._write(can, text)
        super().config_complete()
