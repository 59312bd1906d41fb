"""pynbd.server.loading: the loader table, parameters, and which plugin or filter failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pynbd.errors import ConfigError
from pynbd.plugin import Filter, Plugin
from pynbd.plugins.memory import MemoryPlugin
from pynbd.server import loading
from pynbd.server.backend import Chain
from pynbd.server.loading import (
    Loaded,
    Loader,
    PluginError,
    apply_params,
    guarded,
    instantiate,
    load,
)


class Keys(Plugin):
    name = "keys"
    magic_config_key = "script"

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def config(self, key: str, value: str) -> None:
        if value == "boom":
            raise ValueError("no boom here")
        self.seen.append((key, value))


class Passing(Filter):
    name = "passing"


class Strict(Filter):
    name = "strict"

    def config(self, next_config, key: str, value: str) -> None:
        if key == "strict":
            raise LookupError(value)
        next_config(key, value)

    def get_ready(self) -> None:
        raise OSError(13, "Permission denied", "/var/lib/strict")


def test_builtin_and_file_loaders(tmp_path: Path) -> None:
    assert load("memory", Plugin).cls is MemoryPlugin
    f = tmp_path / "k.py"
    f.write_text("from pynbd.plugin import Plugin\nclass K(Plugin):\n    name = 'k'\n")
    found = load(str(f), Plugin)
    assert found.cls.name == "k" and found.params == []
    with pytest.raises(ConfigError, match="plugin 'no-such'"):
        load("no-such", Plugin)


def test_a_loader_added_to_the_table_is_asked_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """How a new kind of plugin source (a script, say) plugs in: it claims its words and may
    imply parameters, which come before the command line's."""
    script = Loader("test scripts", lambda word: word.endswith(".fake"),
                    lambda word, base: Loaded(Keys, [f"script={word}"]))
    monkeypatch.setattr(loading, "LOADERS", [script, *loading.LOADERS])
    found = load("disk.fake", Plugin)
    assert found.cls is Keys
    chain = Chain(Keys(), [])
    apply_params(chain, Keys, [*found.params, "a=1", "bare"])
    assert chain.plugin.seen == [("script", "disk.fake"), ("a", "1"), ("script", "bare")]
    assert load("memory", Plugin).cls is MemoryPlugin  # words it does not claim go on


def test_failing_layer_is_named() -> None:
    chain = Chain(Keys(), [Passing(), Strict()])
    # Raised by the plugin, reached through two filters: the plugin is named.
    with pytest.raises(PluginError) as e:
        apply_params(chain, Keys, ["x=boom"])
    assert str(e.value) == "keys: config: ValueError: no boom here"
    assert isinstance(e.value.cause, ValueError)
    with pytest.raises(PluginError) as e:
        apply_params(chain, Keys, ["strict=7"])
    assert str(e.value) == "strict: config: LookupError: 7"
    with pytest.raises(PluginError) as e:
        guarded(chain, "get_ready", chain.get_ready)
    assert str(e.value) == "strict: get_ready: /var/lib/strict: Permission denied"


def test_config_error_keeps_its_words() -> None:
    chain = Chain(MemoryPlugin(), [Passing()])
    with pytest.raises(PluginError) as e:
        apply_params(chain, MemoryPlugin, ["frob=1"])
    assert str(e.value) == "memory: unknown parameter 'frob'"  # not "memory: memory: ..."
    # The command line's own rule is not blamed on any plugin.
    class NoMagic(Keys):
        magic_config_key = None

    chain = Chain(NoMagic(), [])
    with pytest.raises(ConfigError) as e:
        apply_params(chain, NoMagic, ["a", "b"])
    assert not isinstance(e.value, PluginError)
    assert str(e.value) == "expecting key=value on the command line but got: b"
    assert chain.plugin.seen == [("script", "a")]


def test_instantiate_names_the_class() -> None:
    class Broken(Plugin):
        def __init__(self) -> None:
            raise RuntimeError("cannot start")

    with pytest.raises(PluginError, match="^Broken: load: RuntimeError: cannot start$"):
        instantiate(Broken)
    assert isinstance(instantiate(Keys), Keys)
