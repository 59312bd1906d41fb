"""The getopt_long shared by pynbd info, copy and dump: glibc's rules and messages.

The expected messages are what glibc 2.36's getopt_long prints for nbdinfo, nbdcopy and nbddump
1.14 (checked against the real tools in tests/interop)."""

from __future__ import annotations

import pytest

from pynbd.tools._getopt import GetoptError, LongOption, getopt_long

LONG = [
    LongOption("help", 0, "help"),
    LongOption("json", 0, "json"),
    LongOption("map", 2, "map"),
    LongOption("short-options", 0, "short-options"),
    LongOption("size", 0, "size"),
    LongOption("color", 0, "colour"),
    LongOption("colour", 0, "colour"),
    LongOption("length", 1, "n"),
]


def test_permutation_abbreviation_and_arguments() -> None:
    opts, rest = getopt_long(["uri", "--js", "--map=base", "-n", "5", "--len=7", "-Vn3", "x"],
                             "n:V", LONG)
    assert opts == [("json", None), ("map", "base"), ("n", "5"), ("n", "7"), ("V", None),
                    ("n", "3")]
    assert rest == ["uri", "x"]
    # aliases of one option are not ambiguous; "--" ends the options
    assert getopt_long(["--col", "--", "--json"], "", LONG) == ([("colour", None)], ["--json"])
    # an optional argument is only taken when attached
    assert getopt_long(["--map", "ctx"], "", LONG) == ([("map", None)], ["ctx"])


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus=x"], "unrecognized option '--bogus=x'"),
    (["--s=x"], "option '--s=x' is ambiguous; possibilities: '--short-options' '--size'"),
    (["--json=1"], "option '--json' doesn't allow an argument"),
    (["--length"], "option '--length' requires an argument"),
    (["-q"], "invalid option -- 'q'"),
    (["-n"], "option requires an argument -- 'n'"),
])
def test_glibc_messages(args: list[str], message: str) -> None:
    with pytest.raises(GetoptError) as e:
        getopt_long(args, "n:V", LONG)
    assert str(e.value) == message


def test_options_are_handed_over_as_met() -> None:
    """A tool acting on an option at once (--help, -V) never reaches a later error."""
    seen: list[tuple[str, str | None]] = []

    class Stop(Exception):
        pass

    def on_option(key: str, value: str | None) -> None:
        seen.append((key, value))
        if key == "V":
            raise Stop

    with pytest.raises(Stop):
        getopt_long(["--json", "-n2", "-V", "--bogus"], "n:V", LONG, on_option=on_option)
    assert seen == [("json", None), ("n", "2"), ("V", None)]
    seen.clear()
    with pytest.raises(GetoptError):
        getopt_long(["--bogus", "-V"], "n:V", LONG, on_option=on_option)
    assert seen == []
