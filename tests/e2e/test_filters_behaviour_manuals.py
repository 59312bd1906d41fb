"""The behaviour filters (nozero, fua, nocache, noparallel, nofilter, multi-conn, exportname,
retry, retry-request, scan, limit, ip, exitlast, exitwhen): each is found by its name, its
manual page has every section and names every parameter, and it runs on the event loop
exactly when it never waits."""

from __future__ import annotations

import pytest

from pynbd.server.loading import load_filter, manual
from tests.e2e.behaviour_chain import Recorder, open_chain

PARAMETERS = {
    "nozero": ["zeromode=", "fastzeromode="],
    "fua": ["fuamode="],
    "nocache": ["cachemode="],
    "noparallel": ["serialize="],
    "nofilter": [],
    "multi-conn": ["multi-conn-mode=", "multi-conn-track-dirty=", "multi-conn-exportname="],
    "exportname": ["default-export=", "exportname-list=", "exportname-strict=",
                   "exportname=", "exportdesc="],
    "retry": ["retries=", "retry-delay=", "retry-exponential=", "retry-readonly="],
    "retry-request": ["retry-request-retries=", "retry-request-delay=",
                      "retry-request-open="],
    "scan": ["scan-ahead=", "scan-clock=", "scan-forever=", "scan-size="],
    "limit": ["limit="],
    "ip": ["allow=", "deny="],
    "exitlast": [],
    "exitwhen": ["exit-when-file-created=", "exit-when-file-deleted=",
                 "exit-when-pipe-closed=", "exit-when-process-exits=", "exit-when-script=",
                 "exit-when-poll="],
}
#: The filters that wait (sleep, run commands, start threads): they run in worker threads.
BLOCKING = {"retry", "retry-request", "scan"}


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_manual(name: str) -> None:
    cls = load_filter(name)
    assert cls.name == name
    text = manual(cls)
    assert text.startswith(f"NAME\n    {name} - ")
    for section in ("SYNOPSIS", "DESCRIPTION", "PARAMETERS", "EXAMPLES"):
        assert f"\n{section}\n" in text, section
    for param in PARAMETERS[name]:
        assert param in text, param
    assert f"nbdkit-{name}-filter(1)" in text


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_on_the_loop_unless_it_waits(name: str) -> None:
    chain, ctx = open_chain(Recorder(), load_filter(name)())
    assert chain.on_loop == (name not in BLOCKING)
    ctx.close()
    chain.cleanup()


@pytest.mark.parametrize(("name", "params"), [
    ("exportname", ["exportdesc=script:echo x"]),
    ("exitwhen", ["exit-when-script=exit 0"]),
])
def test_scripts_run_off_the_loop(name: str, params: list[str]) -> None:
    chain, ctx = open_chain(Recorder(), load_filter(name)(), params=params)
    assert not chain.on_loop
    ctx.close()
    chain.cleanup()
