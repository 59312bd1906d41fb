"""Plugins and filters from the command line: finding them, configuring them, their errors.

The word naming a plugin (``memory``, ``./ramdisk.py``) or a filter (``--filter=WORD``) goes
to the first loader in :data:`LOADERS` that claims it. A loader returns the class and any
parameters implied by the word itself, given to the plugin ahead of the command line's (as
nbdkit's script mode turns ``nbdkit ./x.py`` into ``nbdkit python script=./x.py``). A new
kind of plugin source (nbdkit-style Python or shell scripts, say) is one more loader.

Whatever a plugin or filter raises while it is created, configured or made ready becomes
one :class:`PluginError`: a line naming the plugin and what failed, with the original
exception kept for ``-v``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pynbd import __version__
from pynbd.errors import ConfigError
from pynbd.plugin import CALLBACKS, Filter, Plugin, ThreadModel
from pynbd.server.backend import Chain

__all__ = [
    "LOADERS",
    "Loaded",
    "Loader",
    "PluginError",
    "apply_debug_flags",
    "apply_params",
    "describe",
    "dump_plugin",
    "guarded",
    "instantiate",
    "load",
    "load_filter",
    "load_plugin",
    "manual",
]

_T = TypeVar("_T")
log = logging.getLogger("pynbd.server")
_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")


class PluginError(ConfigError):
    """A plugin or filter failed while loading, configuring or getting ready.

    ``str(error)`` is the one line for the user; :attr:`cause` is what the plugin raised
    (``pynbd serve -v`` shows its traceback).
    """

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.cause = cause


# ---- loaders -------------------------------------------------------------------------------


@dataclass
class Loaded:
    """What a loader found: the class, and parameters the word itself implies."""

    cls: type
    params: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Loader:
    """One way of turning a command-line word into a plugin or filter class."""

    #: What the loader loads (for messages and docs).
    name: str
    #: Whether this loader handles the word.
    claims: Callable[[str], bool]
    #: ``load(word, base)``: the class (a subclass of ``base``); ConfigError if it cannot.
    load: Callable[[str, type], Loaded]


def _is_path(word: str) -> bool:
    return "/" in word or word.endswith(".py")


def _load_class_file(path: str, base: type) -> Loaded:
    """A Python file defining exactly one :class:`Plugin` (or :class:`Filter`) class."""
    kind = base.__name__.lower()
    if not os.path.isfile(path):
        raise ConfigError(f"cannot open {kind} file {path!r}: no such file")
    modname = f"pynbd_user_{kind}_{abs(hash(os.path.abspath(path)))}"
    spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load {path!r}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod  # inspect, pickle and dataclasses look modules up here
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 - any error in the user's module is one line
        del sys.modules[modname]
        raise PluginError(f"{path}: {type(e).__name__}: {e}", e) from None
    found = [v for v in vars(mod).values()
             if inspect.isclass(v) and issubclass(v, base) and v is not base
             and v.__module__ == mod.__name__]
    if len(found) != 1:
        raise ConfigError(f"{path}: expected exactly one {base.__name__} class, found {len(found)}")
    return Loaded(found[0])


def _load_by_name(name: str, base: type) -> Loaded:
    """A plugin or filter by short name: the package's finder, else the entry points.

    Whatever goes wrong (unknown name, a module that fails to import) becomes one clear
    ConfigError: a bad name on the command line must never print a traceback.
    """
    kind = base.__name__.lower()
    package = f"pynbd.{kind}s"
    try:
        finder = getattr(importlib.import_module(package), f"find_{kind}", None)
    except ImportError:
        finder = None
    try:
        found = finder(name) if finder is not None else _from_entry_points(package, name)
    except ConfigError:
        raise
    except (LookupError, ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{kind} '{name}' not found ({type(e).__name__}: {e})") from None
    if found is None:
        raise ConfigError(f"{kind} '{name}' not found")
    if not (inspect.isclass(found) and issubclass(found, base)):
        raise ConfigError(f"{kind} '{name}' is not a pynbd {base.__name__} class")
    return Loaded(found)


def _from_entry_points(group: str, name: str) -> type | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        if ep.name == name:
            return ep.load()  # type: ignore[no-any-return]
    return None


def _is_nbdkit_python(word: str) -> bool:
    if not word.endswith(".py") or not os.path.isfile(word):
        return False
    from pynbd.plugins.python import is_nbdkit_script

    return is_nbdkit_script(word)


def _load_nbdkit_python(path: str, base: type) -> Loaded:
    """``pynbd serve ./x.py`` for a script written against nbdkit's Python API: the python
    plugin with ``script=./x.py`` (what nbdkit's shebang scripts do)."""
    if base is not Plugin:
        raise ConfigError(f"{path}: an nbdkit Python plugin script cannot be used as a filter")
    from pynbd.plugins.python import PythonPlugin

    return Loaded(PythonPlugin, [f"script={path}"])


#: Tried in order; the first that claims the word loads it.
LOADERS: list[Loader] = [
    Loader("nbdkit Python plugin script (module-level open, get_size, pread)",
           _is_nbdkit_python, _load_nbdkit_python),
    Loader("Python file with one Plugin or Filter class", _is_path, _load_class_file),
    Loader("built-in or installed (entry point) by name", lambda word: True, _load_by_name),
]


def load(word: str, base: type) -> Loaded:
    """The plugin (``base=Plugin``) or filter (``base=Filter``) the word names."""
    for loader in LOADERS:
        if loader.claims(word):
            return loader.load(word, base)
    raise ConfigError(f"{base.__name__.lower()} '{word}' not found")


def load_plugin(name: str) -> type[Plugin]:
    return load(name, Plugin).cls


def load_filter(name: str) -> type[Filter]:
    return load(name, Filter).cls


# ---- configuring, with one clear line when a plugin fails ----------------------------------


def describe(obj: object) -> str:
    """How messages name a plugin or filter (instance or class)."""
    cls = obj if inspect.isclass(obj) else type(obj)
    return getattr(cls, "name", "") or cls.__name__


def _what_failed(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _message(who: object, phase: str, e: BaseException) -> str:
    name = describe(who)
    if isinstance(e, ConfigError):  # the plugin's own words for the user, shown as they are
        return str(e)
    return f"{name}: {phase}: {_what_failed(e)}"


def _culprit(chain: Chain, e: BaseException) -> object:
    """The plugin or filter whose method raised (the innermost one on the traceback)."""
    layers = [chain.plugin, *chain.filters]
    found: object = chain.plugin
    tb = e.__traceback__
    while tb is not None:
        me = tb.tb_frame.f_locals.get("self")
        if any(me is layer for layer in layers):
            found = me
        tb = tb.tb_next
    return found


def guarded(chain: Chain, phase: str, call: Callable[..., _T], *args: Any) -> _T:
    """``call(*args)``, a step of the chain's life: a failure is a :class:`PluginError`."""
    try:
        return call(*args)
    except PluginError:
        raise
    except Exception as e:  # noqa: BLE001 - a plugin may raise anything; one line says what
        raise PluginError(_message(_culprit(chain, e), phase, e), e) from None


def instantiate(cls: type[_T]) -> _T:
    """A plugin or filter object (its ``__init__`` is nbdkit's load callback)."""
    try:
        return cls()
    except Exception as e:  # noqa: BLE001
        raise PluginError(_message(cls, "load", e), e) from None


def apply_params(chain: Chain, plugin_cls: type[Plugin], params: list[str]) -> None:
    """nbdkit's key=value rule, with the magic key for bare values."""
    magic = plugin_cls.magic_config_key
    first_bare = True
    for p in params:
        key, sep, value = p.partition("=")
        if sep and _KEY_RE.match(key):
            pass
        elif magic:
            key, value = magic, p
        elif first_bare:
            first_bare = False
            key, value = "script", p
        else:
            raise ConfigError(f"expecting key=value on the command line but got: {p}")
        guarded(chain, "config", chain.config, key, value)


def apply_debug_flags(chain: Chain, flags: list[str]) -> None:
    """``-D NAME.FLAG=N``: set the plugin's or filter's ``debug_FLAG`` attribute (nbdkit sets
    the C global ``NAME_debug_FLAG``; dots in FLAG are underscores). ``-D
    nbdkit.backend.controlpath=0`` and ``datapath=0`` silence those ``-v`` lines. A flag that
    names nothing loaded, or a variable the layer does not have, is a warning, as in nbdkit."""
    control = data = True
    for spec in flags:
        name_flag, _, text = spec.partition("=")
        name, _, flag = name_flag.partition(".")
        try:
            value = int(text, 0)
        except ValueError:
            raise ConfigError(f"-D: could not parse value of debug flag {spec!r}") from None
        if name in ("nbdkit", "pynbd"):
            if flag == "backend.controlpath":
                control = bool(value)
            elif flag == "backend.datapath":
                data = bool(value)
            else:
                log.warning("debug flag -D %s was not used", name_flag)
            continue
        layers: list[Plugin | Filter] = [chain.plugin, *chain.filters]
        targets = [obj for obj in layers if obj.name == name]
        attr = "debug_" + flag.replace(".", "_")
        if not targets:
            log.warning("debug flag -D %s was not used", name_flag)
        elif not hasattr(targets[0], attr):
            log.warning("-D %s: %s does not contain a global variable called %s_%s",
                        name_flag, name, name, attr)
        else:
            for obj in targets:
                setattr(obj, attr, value)
    chain.set_debug_paths(control, data)


# ---- --help and --dump-plugin --------------------------------------------------------------


def manual(cls: type) -> str:
    doc = inspect.getdoc(cls) or f"{cls.__name__}: no manual page."
    return doc.rstrip() + "\n"


def _source_path(cls: type) -> str:
    try:
        return os.path.abspath(inspect.getfile(cls))
    except (TypeError, OSError):
        return getattr(sys.modules.get(cls.__module__), "__file__", None) or cls.__module__


def dump_plugin(chain: Chain) -> str:
    """``--dump-plugin``: nbdkit's ``key=value`` lines about the plugin."""
    plugin = chain.plugin
    cls = type(plugin)
    lines = [f"path={_source_path(cls)}", f"name={cls.name}",
             f"version={cls.version or __version__}", "api_version=2",
             f"max_thread_model={ThreadModel(cls.thread_model).name.lower()}",
             f"thread_model={chain.thread_model.name.lower()}", "errno_is_preserved=1"]
    if cls.magic_config_key:
        lines.append(f"magic_config_key={cls.magic_config_key}")
    have = guarded(chain, "dump_plugin", plugin.callbacks)
    lines += [f"has_{cb}=1" for cb in CALLBACKS if cb in have]
    lines += list(guarded(chain, "dump_plugin", plugin.dump_plugin))
    return "\n".join(lines) + "\n"
