"""Built-in plugins and the plugin registry.

:func:`find_plugin` resolves a short plugin name (``pynbd serve NAME``): first the built-in
plugins of this package (each public module ``NAME.py``, ``-`` in a name written ``_``,
defines the plugin class whose ``name`` is ``NAME``), then third-party plugins registered
under the ``pynbd.plugins`` entry point group::

    [project.entry-points."pynbd.plugins"]
    mydisk = "mypackage.mydisk:MyDiskPlugin"
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import re

from pynbd.errors import ConfigError
from pynbd.plugin import Plugin

__all__ = ["BUILTIN_PLUGINS", "builtins_in", "find_plugin"]

_GROUP = "pynbd.plugins"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")
#: Names whose module is not the name with "-" turned into "_".
_MODULE_ALIASES = {"S3": "s3"}


def builtins_in(package: str, path: list[str]) -> dict[str, str]:
    """Built-ins of a package: every public module ``foo_bar.py`` is the plugin or filter
    ``foo-bar`` (name -> module path); the module defines one class of that name."""
    reverse = {mod: name for name, mod in _MODULE_ALIASES.items()}
    out = {}
    for info in pkgutil.iter_modules(path):
        if not info.name.startswith("_"):
            out[reverse.get(info.name, info.name.replace("_", "-"))] = f"{package}.{info.name}"
    return dict(sorted(out.items()))


#: Built-in plugins: short name -> module (imported on first use).
BUILTIN_PLUGINS: dict[str, str] = builtins_in(__name__, __path__)


def _check(kind: str, name: str, obj: object, base: type) -> type:
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(f"{kind} '{name}' is not a subclass of pynbd.plugin.{base.__name__}")
    return obj


def _builtin_class(kind: str, name: str, module: str, base: type) -> type:
    mod = importlib.import_module(module)
    found = [v for v in vars(mod).values()
             if isinstance(v, type) and issubclass(v, base) and v is not base
             and v.__module__ == mod.__name__ and getattr(v, "name", None) == name]
    if len(found) != 1:
        raise ConfigError(f"{kind} '{name}': module {module} defines {len(found)} "
                          f"{base.__name__} classes named '{name}'")
    return found[0]


def _lookup(kind: str, group: str, builtins: dict[str, str], name: str, base: type) -> type:
    """Shared by :func:`find_plugin` and :func:`pynbd.filters.find_filter`."""
    if not _NAME_RE.match(name):
        raise ConfigError(f"unknown {kind} '{name}'")
    module = builtins.get(name)
    if module is not None:
        return _builtin_class(kind, name, module, base)
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
