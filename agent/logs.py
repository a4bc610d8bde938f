"""Logging set-up: human-readable by default, one JSON object per line for journald and collectors.

Under systemd (stderr is the journal stream) every line starts with its syslog priority (``<3>`` for an
error, sd-daemon(3)), so ``journalctl -p warning`` shows warnings and errors. :class:`Quiet` keeps a failure
that repeats (the engine down, a broker away) from flooding the log.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

#: syslog priorities of the log levels (journald reads them from a "<N>" prefix)
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class JournalPrefix(logging.Formatter):
    """Another formatter's line, prefixed with the record's syslog priority."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 3 if record.levelno > logging.ERROR else 6)
        return f"<{priority}>" + self.inner.format(record)


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device and inode of the stream it connected (systemd.exec(5))."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return bool(value) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


def setup(level: str = "info", fmt: str = "text", *, journal: bool | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if stderr_is_journal() if journal is None else journal:
        formatter = JournalPrefix(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # third-party chatter stays out of the agent's log unless debugging
    for noisy in ("urllib3", "docker", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "debug" else logging.DEBUG)


class Quiet:
    """Logs the first of a run of identical failures, then at most one line per ``interval`` saying how many
    more there were, and one line when it stops (:meth:`ok`)."""

    def __init__(
        self, logger: logging.Logger, interval: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._key: str | None = None
        self._count = 0
        self._last = 0.0

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        """``key`` says what counts as "the same failure" (the message may carry changing numbers)."""
        now = self.clock()
        with self._lock:
            if key != self._key:
                self._key, self._count, self._last = key, 0, now
                emit: str | None = ""
            else:
                self._count += 1
                emit = f" (repeated {self._count} times)" if now - self._last >= self.interval else None
                if emit is not None:
                    self._last, self._count = now, 0
        if emit is not None:
            self.logger.log(level, msg + emit, *args)

    def ok(self, msg: str, *args: object) -> None:
        """The failure is over: say so once (only if one was logged)."""
        with self._lock:
            had, self._key, self._count = self._key, None, 0
        if had is not None:
            self.logger.info(msg, *args)
