"""The exportname filter: change the export names a client sees. Its manual page is
:class:`ExportnameFilter`'s docstring."""

from __future__ import annotations

import errno
import logging
import shlex
from typing import Any

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._behaviour_common import shell
from pynbd.filters._params import parse_bool
from pynbd.plugin import Filter

__all__ = ["ExportnameFilter"]

log = logging.getLogger("pynbd.filters.exportname")

_LISTS = {"keep": "keep", "error": "error", "empty": "empty", "defaultonly": "defaultonly",
          "default-only": "defaultonly", "explicit": "explicit"}
#: The longest description kept from a script (the NBD protocol's longest string).
MAX_DESCRIPTION = 4096


class ExportnameFilter(Filter):
    """NAME
        exportname - pynbd exportname filter: change export names between client and plugin

    SYNOPSIS
        pynbd serve --filter=exportname PLUGIN [default-export=NAME]
                    [exportname-list=MODE] [exportname-strict=true] [exportname=NAME]...
                    [exportdesc=DESC] [PLUGIN-ARGS...]

    DESCRIPTION
        Some plugins (file with dir=, say) serve different data under different export
        names, and a client may ask the server for its list of exports. The list the plugin
        gives (or does not give) is not always what clients should see: this filter changes
        it, decides which export a client asking for the default export ("") gets, and may
        refuse names that were not listed.

        This is nbdkit-exportname-filter(1) for pynbd, with nbdkit 1.32's parameters.

    PARAMETERS
        default-export=NAME
            A client asking for the default export ("") gets the plugin's export NAME
            instead of the plugin's own default.

        exportname-list=keep
        exportname-list=error
        exportname-list=empty
        exportname-list=defaultonly
        exportname-list=explicit
            What a client listing the exports (NBD_OPT_LIST) is told: keep (the default)
            passes on the plugin's list; error answers with an error instead; empty gives
            an empty list; defaultonly gives just the name of the default export; explicit
            gives the names set with exportname=. (default-only is the same as
            defaultonly.) The list need not be the truth: a listed name may be refused,
            and a client may connect to a name it learnt elsewhere.

        exportname-strict=false
        exportname-strict=true
            With true, a client asking for an export name not given with exportname= is
            refused (and the default export "" only if exportname= lists it). Limiting
            clients to the plugin's own list needs that list repeated with exportname=.

        exportname=NAME
            Add NAME to the list of exports; may be given several times.

        exportdesc=keep
        exportdesc=none
        exportdesc=fixed:STRING
        exportdesc=script:SCRIPT
            The description sent with an export name: keep (the default) the plugin's;
            none, no description (to leak nothing); fixed:STRING the same STRING for every
            export; script:SCRIPT the output of the shell command SCRIPT, run with $name
            set to the export's name (at most 4096 bytes, without its last newline).

    EXAMPLES
        A client asking for "" gets file2 of the directory instead of an error:

            pynbd serve --filter=exportname file dir=/path/to/dir default-export=file2

        List no exports: clients must know the names:

            pynbd serve --filter=exportname file dir=/path/to/dir exportname-list=empty

        Allow file1 and file3, but not file2:

            pynbd serve --filter=exportname file dir=/path/to/dir \\
                exportname-list=explicit exportname-strict=true \\
                exportname=file1 exportname=file3

        Describe each export with ls -l:

            pynbd serve --filter=exportname file dir=/path/to/dir \\
                exportdesc=script:'ls -l /path/to/dir/"$name"'
    """

    name = "exportname"
    nonblocking = True
    config_help = (
        'default-export=<NAME>     Canonical name for the "" default export.\n'
        "exportname-list=<MODE>    Which exports to advertise: keep (default), error,\n"
        "                          empty, defaultonly, explicit.\n"
        "exportname-strict=<BOOL>  Limit clients to explicit exports (default false).\n"
        "exportname=<NAME>         Add an explicit export name, may be repeated.\n"
        "exportdesc=<MODE>         Set descriptions according to mode: keep (default),\n"
        "                          none, fixed:STRING, script:SCRIPT.")

    def __init__(self) -> None:
        self.default: str | None = None
        self.list = "keep"
        self.strict = False
        self.exports: list[str] = []
        self.desc_mode = "keep"
        self.desc: str | None = None
        #: The layer below's default_export (kept from the first time the server asks).
        self._below_default: Any = None

    def config(self, next_config: Any, key: str, value: str) -> None:
        if key in ("default-export", "default_export"):
            self.default = value
        elif key in ("exportname-list", "exportname_list"):
            if value not in _LISTS:
                raise ConfigError(f"unrecognized exportname-list mode: {value}")
            self.list = _LISTS[value]
        elif key in ("exportname-strict", "exportname_strict"):
            self.strict = parse_bool(value)
        elif key == "exportname":
            self.exports.append(value)
        elif key == "exportdesc":
            self._config_desc(value)
        else:
            next_config(key, value)

    def _config_desc(self, value: str) -> None:
        if value in ("keep", "none"):
            self.desc_mode, self.desc = value, None
        elif value.startswith("fixed:"):
            self.desc_mode, self.desc = "fixed", value[6:]
        elif value.startswith("script:"):
            self.desc_mode, self.desc = "script", value[7:]
        else:
            raise ConfigError(f"unrecognized exportdesc mode: {value}")

    def config_complete(self) -> None:
        # Only a description script waits (for its command): otherwise pure work on memory.
        self.nonblocking = self.desc_mode != "script"  # type: ignore[misc]

    def _describe(self, name: str, default: str | None) -> str | None:
        if self.desc_mode == "keep":
            return default
        if self.desc_mode != "script":
            return self.desc
        assert self.desc is not None
        command = f"export name; name={shlex.quote(name)}\n{self.desc}\n"
        log.debug("%s", command)
        try:
            out = shell(command, capture=True).stdout[:MAX_DESCRIPTION]
        except OSError as e:
            log.debug("exportdesc script: %s", e)
            return None
        if out.endswith(b"\n"):
            out = out[:-1]
        return out.decode("utf-8", "replace")

    def list_exports(self, next_list_exports: Any, readonly: bool,
                     is_tls: bool) -> list[tuple[str, str]] | None:
        if self.list == "error":
            raise CommandError(errno.EPERM, "export list restricted by policy")
        if self.list == "empty":
            return []
        if self.list == "defaultonly":
            return None  # the server lists the default export's canonical name
        if self.list == "explicit":
            source: list[tuple[str, str | None]] = [(n, None) for n in self.exports]
        else:
            source = [(n, d) for n, d in _pairs(next_list_exports(readonly, is_tls))]
        return [(n, self._describe(n, d) or "") for n, d in source]

    def default_export(self, next_default_export: Any, readonly: bool,
                       is_tls: bool) -> str | None:
        self._below_default = next_default_export
        if self.strict:
            # "" is only allowed if it was listed
            return (self.default or "") if "" in self.exports else None
        if self.default is not None:
            return self.default
        return next_default_export(readonly, is_tls)  # type: ignore[no-any-return]

    def open(self, next_open: Any, readonly: bool, export_name: str, is_tls: bool) -> Any:
        if self.strict and export_name not in self.exports:
            # nbdkit 1.32 says "export 'NAME not found" (a quote missing)
            raise CommandError(errno.ENOENT, f"export '{export_name}' not found")
        below = export_name
        if below == "" and self._below_default is not None:
            # nbdkit resolves "" again at every layer: when this filter's answer for the
            # default export is "" itself, the layer below opens its own default export.
            below = self._below_default(readonly, is_tls)
            if below is None:
                raise CommandError(errno.ENOENT, 'default export ("") not permitted')
        next_open(readonly, below)
        return export_name

    def export_description(self, next: Any, h: str) -> str | None:
        default = next.export_description() if self.desc_mode == "keep" else None
        return self._describe(h, default)


def _pairs(exports: Any) -> list[tuple[str, str | None]]:
    """A layer's list_exports answer as (name, description) pairs."""
    if exports is None:
        return []
    out: list[tuple[str, str | None]] = []
    for e in exports:
        if isinstance(e, str):
            out.append((e, None))
        else:
            out.append((str(e[0]), e[1] if len(e) > 1 else None))
    return out
