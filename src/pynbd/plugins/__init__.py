"""Built-in plugins and the plugin registry.

:func:`find_plugin` resolves a short plugin name (``pynbd serve NAME``): first the built-in
plugins of this package, then third-party plugins registered under the ``pynbd.plugins``
entry point group::

    [project.entry-points."pynbd.plugins"]
    mydisk = "mypackage.mydisk:MyDiskPlugin"
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re

from pynbd.errors import ConfigError
from pynbd.plugin import Plugin

__all__ = ["BUILTIN_PLUGINS", "find_plugin"]

#: Built-in plugins: short name -> "module:Class" (imported on first use).
BUILTIN_PLUGINS: dict[str, str] = {
    "memory": "pynbd.plugins.memory:MemoryPlugin",
    "file": "pynbd.plugins.file:FilePlugin",
    "null": "pynbd.plugins.null:NullPlugin",
    "zero": "pynbd.plugins.zero:ZeroPlugin",
    "full": "pynbd.plugins.full:FullPlugin",
    "pattern": "pynbd.plugins.pattern:PatternPlugin",
}

_GROUP = "pynbd.plugins"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")


def _import(target: str) -> object:
    module, _, attr = target.partition(":")
    obj: object = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _check(kind: str, name: str, obj: object, base: type) -> type:
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(f"{kind} '{name}' is not a subclass of pynbd.plugin.{base.__name__}")
    return obj


def _lookup(kind: str, group: str, builtins: dict[str, str], name: str, base: type) -> type:
    """Shared by :func:`find_plugin` and :func:`pynbd.filters.find_filter`."""
    if not _NAME_RE.match(name):
        raise ConfigError(f"unknown {kind} '{name}'")
    target = builtins.get(name)
    if target is not None:
        return _check(kind, name, _import(target), base)
    for ep in importlib.metadata.entry_points(group=group, name=name):
        try:
            obj = ep.load()
        except Exception as e:  # a broken third-party package: say which, no traceback
            raise ConfigError(
                f"{kind} '{name}': cannot load entry point {ep.value!r}: "
                f"{type(e).__name__}: {e}") from e
        return _check(kind, name, obj, base)
    raise ConfigError(f"unknown {kind} '{name}'")


def find_plugin(name: str) -> type[Plugin]:
    """The plugin class called ``name``: a built-in, else a ``pynbd.plugins`` entry point.

    Raises :class:`~pynbd.errors.ConfigError` ``unknown plugin 'NAME'`` if there is none.
    """
    return _lookup("plugin", _GROUP, BUILTIN_PLUGINS, name, Plugin)  # type: ignore[return-value]
