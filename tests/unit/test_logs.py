"""Log lines journald can rank, and failures that repeat without flooding the log."""

from __future__ import annotations

import logging

import pytest

from agent.logs import JournalPrefix, Quiet


def test_every_line_carries_its_syslog_priority() -> None:
    fmt = JournalPrefix(logging.Formatter("%(message)s"))
    for level, prefix in (
        (logging.ERROR, "<3>"),
        (logging.WARNING, "<4>"),
        (logging.INFO, "<6>"),
        (logging.DEBUG, "<7>"),
    ):
        record = logging.LogRecord("x", level, __file__, 1, "hello", None, None)
        assert fmt.format(record) == prefix + "hello"


def test_a_repeated_failure_is_logged_once_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    quiet = Quiet(logging.getLogger("t"), interval=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "t"):
        for _ in range(10):
            quiet.log(logging.WARNING, "down", "engine down (%s)", "refused")
            now[0] += 5
        now[0] += 60
        quiet.log(logging.WARNING, "down", "engine down (%s)", "refused")
        quiet.ok("engine back")
        quiet.ok("engine back")  # said once
        quiet.log(logging.WARNING, "other", "another failure")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "engine down (refused)",
        "engine down (refused) (repeated 10 times)",
        "engine back",
        "another failure",
    ]
