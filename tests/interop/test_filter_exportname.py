"""The exportname filter side by side with nbdkit's, over a plugin with several exports
(tests/data/python/exports.py: list, default export "described", descriptions): the lists
clients are given, the export a client gets for "", descriptions, strict mode."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.interop.behaviour_compare import EXPORTS, bad_params, describe, list_exports

#: Names a description script must see quoted right.
ODD = ["plain", "with space", "it's", "$HOME", 'q"uote', "back\\slash"]


def _both(pynbd_server: Any, nbdkit_server: Any, params: list[str],
          check: Any) -> tuple[Any, Any]:
    args = ["--filter=exportname", "python", EXPORTS, *params]
    servers = (pynbd_server(*args), nbdkit_server(*args))
    with ThreadPoolExecutor(2) as pool:
        got, want = pool.map(check, servers)
    assert got == want, f"{params}: pynbd {got}, nbdkit {want}"
    return got


LISTS = [
    ([], {"exports": [["plain", ""], ["described", "an export with a description"],
                      ["bytes-name", ""]]}),
    (["exportname-list=error"], {"error": 95}),
    (["exportname-list=empty"], {"exports": []}),
    (["exportname-list=defaultonly"], {"exports": [["described", ""]]}),
    (["exportname-list=default-only", "default-export=plain"], {"exports": [["plain", ""]]}),
    (["exportname_list=explicit", "exportname=x", "exportname=", "exportname=y"],
     {"exports": [["x", ""], ["", ""], ["y", ""]]}),
    (["exportdesc=none"], {"exports": [["plain", ""], ["described", ""],
                                       ["bytes-name", ""]]}),
    (["exportdesc=fixed:same for all"], {"exports": [["plain", "same for all"],
                                                     ["described", "same for all"],
                                                     ["bytes-name", "same for all"]]}),
    (["exportname-list=explicit", *(f"exportname={n}" for n in ODD),
      "exportdesc=script:printf '<%s>\\n\\n' \"$name\""],
     {"exports": [[n, f"<{n}>\n"] for n in ODD]}),
]


@pytest.mark.parametrize(("params", "want"), LISTS)
def test_lists(pynbd_server, nbdkit_server, params: list[str], want: dict[str, Any]) -> None:
    got = _both(pynbd_server, nbdkit_server, params, lambda srv: list_exports(srv.uri))
    assert got == want


CONNECTS = [
    ([], ["", "plain", "other"]),
    (["default-export=plain"], ["", "described"]),
    (["default-export="], [""]),
    (["exportname-strict=true", "exportname=plain"], ["plain", "described", ""]),
    (["exportname-strict=1", "exportname=", "exportname=plain", "default-export=plain"],
     ["", "plain", "described"]),
    (["exportname-strict=true", "exportname=", "exportname=plain"], ["", "plain"]),
    (["exportdesc=fixed:fixed"], ["", "plain"]),
    (["exportdesc=none"], ["described"]),
    (["exportdesc=script:echo \"[$name]\""], ["", "plain", "other"]),
]


@pytest.mark.parametrize(("params", "exports"), CONNECTS)
def test_connect(pynbd_server, nbdkit_server, params: list[str], exports: list[str]) -> None:
    def each(srv: Any) -> list[dict[str, Any]]:
        return [describe(srv.sock, e) for e in exports]
    got = _both(pynbd_server, nbdkit_server, params, each)
    if params == ["default-export=plain"]:
        assert got[0]["canonical"] == "plain" and got[0]["data"].startswith("plain")
    if params[:2] == ["exportname-strict=true", "exportname=plain"]:
        assert [("error" in g) for g in got] == [False, True, True]


def test_failing_description_script(pynbd_server, nbdkit_server):
    """A script that prints nothing gives an empty description, which both servers send
    empty."""
    args = ["--filter=exportname", "python", EXPORTS, "exportdesc=script:echo oops >&2; exit 3"]
    mine = describe(pynbd_server(*args).sock, "plain")
    theirs = describe(nbdkit_server(*args).sock, "plain")
    assert mine["description"] == theirs["description"] == ""
    assert mine == theirs


def test_bad_parameters():
    bad_params([["--filter=exportname", "memory", "1M", "exportname-list=x"],
                ["--filter=exportname", "memory", "1M", "exportname-list=KEEP"],
                ["--filter=exportname", "memory", "1M", "exportdesc=fixed"],
                ["--filter=exportname", "memory", "1M", "exportdesc=x"],
                ["--filter=exportname", "memory", "1M", "exportname-strict=x"]])
