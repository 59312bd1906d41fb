"""pynbd.plugin.completions(): the server's answers deferred to the end of a plugin's batch."""

from __future__ import annotations

import logging

import pytest

from pynbd.plugin import _defer, completions


def test_outside_a_batch_nothing_is_deferred() -> None:
    ran: list[int] = []
    assert _defer(lambda: ran.append(1)) is False
    assert ran == []


def test_deferred_calls_run_once_when_the_outermost_block_ends() -> None:
    ran: list[str] = []
    with completions():
        assert _defer(lambda: ran.append("a"))
        with completions():
            assert _defer(lambda: ran.append("b"))
        assert ran == []  # the inner block leaves them to the outer one
    assert ran == ["a", "b"]
    assert _defer(lambda: ran.append("c")) is False


def test_a_failing_call_is_logged_and_the_others_still_run(
        caplog: pytest.LogCaptureFixture) -> None:
    ran: list[int] = []

    def boom() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="pynbd.server"), completions():
        _defer(boom)
        _defer(lambda: ran.append(2))
    assert ran == [2]
    assert "answering completions" in caplog.text
