"""The sh plugin: an export served by a shell script (or any executable), nbdkit's calling
convention exactly. Its manual page is :class:`ShPlugin`'s docstring."""

from __future__ import annotations

import os
import re
import sys

from pynbd.errors import ConfigError
from pynbd.plugins._shell import ShellPlugin, Status, as_text, chomp

__all__ = ["ShPlugin"]

INLINE_SCRIPT = "inline-script.sh"


def stdin_serves_a_client() -> bool:
    """Whether this server talks NBD on its stdin (``-s``, ``--single``, ``--stdin``): then
    stdin cannot also hold a script (nbdkit_stdio_safe). Read from the command line, as
    the options are parsed by the time a plugin is configured."""
    for a in sys.argv[1:]:
        if a == "--":
            break
        if re.fullmatch(r"-[46fnorsvV]*s[46fnorsvV]*", a):
            return True
        if a.startswith(("--si", "--st")) and ("--single".startswith(a)
                                                or "--stdin".startswith(a)):
            return True
    return False


class ShPlugin(ShellPlugin):
    """NAME
        sh - pynbd shell, script or executable plugin

    SYNOPSIS
        pynbd serve sh /path/to/script [arguments...]

        pynbd serve sh - <<'EOF'
        ... shell script ...
        EOF

    DESCRIPTION
        sh serves an export answered by a script: a shell script, a script in any
        language, or any executable. Every callback runs the script once, as

            /path/to/script METHOD ARGS...

        This is nbdkit-sh-plugin(3) for pynbd: the same scripts run unchanged (the
        calling convention below is nbdkit 1.32's), and the command lines are the same.
        To write the script's fragments on the command line instead, see the eval plugin.

        The script must be executable (chmod +x). "-" reads the script from stdin into
        $tmpdir/inline-script.sh; without a "#!" line it runs under /bin/sh. An inline
        script cannot be used with -s, where stdin is the client.

      Exit status
        0       success (true, for the methods answering a boolean)
        1       error; stderr may start with an errno name and a message, as in
                "ENOSPC Out of space" (EPERM EIO ENOMEM EINVAL ENOSPC EOVERFLOW ESHUTDOWN
                ENOTSUP EOPNOTSUPP EROFS EDQUOT EFBIG, in any case). The client gets that
                errno (EIO for anything else); the log gets "SCRIPT: Out of space".
                stderr is ignored on success.
        2       the method is not supported by the script: its default applies (below)
        3       false, for the methods answering a boolean; an error elsewhere
        4-255   reserved: an error, like 1

      Temporary directory
        Each call is a new process, so state lives in files. The plugin makes a private
        empty directory for them at start-up, passes its name to every call as $tmpdir
        (in the script's environment only), and removes it, with what it holds, at exit.
        "open" may make a per-connection directory there and print its name as the
        handle.

      Methods
        Arguments: booleans are "true" or "false"; <h> is what "open" printed (one
        trailing newline removed); sizes printed may use nbdkit's size syntax (1M, 4K, 2s).
        <flags> is a comma-separated list of fua, may_trim, req_one, fast (or empty).
        Scripts should ignore arguments they do not expect.

        load, unload, config_complete, get_ready, after_fork, preconnect <readonly>
            Nothing to print. unload's errors are ignored. load runs when the script
            parameter is seen.
        magic_config_key
            Print a key: later bare arguments VALUE then mean KEY=VALUE.
        config <key> <value>
            Missing: every key=value argument is refused.
        dump_plugin
            Print extra key=value lines for --dump-plugin.
        thread_model
            Print parallel, serialize_requests, serialize_all_requests or
            serialize_connections. Missing: serialize_all_requests (two calls never run
            at the same time); a script safe to run in parallel must say so.
        list_exports <readonly> <tls>
            A first line NAMES (then one name per line), INTERLEAVED (name and description
            lines in turn) or NAMES+DESCRIPTIONS (all names, then all descriptions); any
            other first line is the first name of a NAMES list. Missing: the default
            export only.
        default_export <readonly> <tls>
            The name of the export "" (a list as above is allowed: its first name).
            Missing: "".
        open <readonly> <exportname> <tls>
            Print the handle. Missing: the handle is "".
        close <h>
            Every status is ignored.
        get_size <h>
            Print the size. Required.
        export_description <h>
            Print the description. Missing: none.
        block_size <h>
            Print minimum, preferred and maximum block sizes. Missing: none advertised.
        can_write, can_flush, can_trim, can_zero, can_extents, can_multi_conn,
        is_rotational, can_fast_zero <h>
            Exit 0 for true, 3 for false. Missing: false (can_fast_zero: true when zero
            is not supported). The plugin cannot tell which methods a script has, so
            pwrite, flush, trim, zero and extents are only called when their can_* method
            exits 0.
        can_fua, can_cache <h>
            Print none, emulate or native. Missing: can_fua emulates FUA by flush when
            can_flush is true; can_cache is none (cache is only called after native).
        pread <h> <count> <offset>
            Print exactly count bytes. Required.
        pwrite <h> <count> <offset> <flags>
            The data is on stdin.
        flush <h>, trim <h> <count> <offset> <flags>, cache <h> <count> <offset>
            Missing: nothing is done.
        zero <h> <count> <offset> <flags>
            Missing (or ENOTSUP/EOPNOTSUPP on stderr): zeroes are written with pwrite,
            and a "fast" zero fails at once.
        extents <h> <count> <offset> <flags>
            Print lines "offset length [type]": type is a number, empty (data), or words
            containing hole and/or zero ("hole,zero").

        Not supported: name, version, longname, description, config_help.

    PARAMETERS
        [script=]SCRIPT
            The script (or executable) to run, or "-" for a script on stdin. It must
            be the first parameter.

        [KEY=]VALUE ...
            Every other parameter is passed to the script's config method. A bare VALUE
            is KEY=VALUE when the script's magic_config_key method printed KEY.

    EXAMPLES
        A 1M disk of zeroes, read-only:

            pynbd serve sh - <<'EOF'
            case "$1" in
              get_size) echo 1M ;;
              pread) dd if=/dev/zero count=$3 iflag=count_bytes ;;
              *) exit 2 ;;
            esac
            EOF

        A writable disk in a file of $tmpdir:

            case "$1" in
              get_ready) truncate -s 64M $tmpdir/disk ;;
              get_size) stat -L -c %s $tmpdir/disk ;;
              pread) dd if=$tmpdir/disk skip=$4 count=$3 iflag=count_bytes,skip_bytes ;;
              can_write) exit 0 ;;
              pwrite) dd of=$tmpdir/disk seek=$4 conv=notrunc oflag=seek_bytes ;;
              *) exit 2 ;;
            esac

        What a script reports to --dump-plugin (thread_model, its own lines):

            pynbd serve --dump-plugin sh ./script.sh
    """

    name = "sh"
    magic_config_key = "script"
    config_help = ("script=<FILENAME>     (required) The shell script to run.\n"
                   "[other arguments may be used by the plugin that you load]")
    tmpdir_prefix = "pynbdsh"

    def __init__(self) -> None:
        super().__init__()
        self._script: str | None = None
        self._magic: str | None = None

    def script(self, method: str) -> str | None:
        return self._script

    def config(self, key: str, value: str) -> None:
        if self._script is None:
            self._set_script(key, value)
            return
        if key == "script":
            # A bare value: the script's own magic key, if it has one.
            if self._magic is None:
                raise ConfigError(f"{self._script}: expecting key=value on the command "
                                  f"line but got: {value}")
            key = self._magic
        status, _ = self.config_call("config", key, value)
        if status == Status.MISSING:
            raise ConfigError(f"{self._script}: this plugin does not need command line "
                              "configuration")

    def _set_script(self, key: str, value: str) -> None:
        if key != "script":
            raise ConfigError("the first parameter must be script=/path/to/script")
        if value == "-":
            self._script = self._inline_script()
        else:
            try:
                self._script = os.path.realpath(value, strict=True)
            except OSError as e:
                raise ConfigError(f"realpath: {value}: {e.strerror}") from None
        self.config_call("load")
        status, out = self.config_call("magic_config_key")
        if status == Status.OK:
            self._magic = as_text(chomp(out))

    def _inline_script(self) -> str:
        """Copy the script on stdin to $tmpdir/inline-script.sh (mode 0500)."""
        if stdin_serves_a_client():
            raise ConfigError("inline script is incompatible with -s")
        path = os.path.join(self.tmpdir, INLINE_SCRIPT)
        try:
            with open(0, "rb", closefd=False) as stdin, open(path, "wb") as f:
                while chunk := stdin.read(1 << 16):
                    f.write(chunk)
            os.chmod(path, 0o500)
        except OSError as e:
            raise ConfigError(f"sh: failed to copy inline script to temporary file: "
                              f"{e.strerror}") from None
        return path

    def config_complete(self) -> None:
        if self._script is None:
            raise ConfigError("missing script parameter")
        super().config_complete()
