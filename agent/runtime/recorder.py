"""What enforcement writes to the state database goes through here, so that enforcement never waits on it.

A slow SD card, a database locked by another process, a frozen or full filesystem: the enforcer hands its
records (decisions with their telemetry, verified digests, counters) to :class:`Recorder` and goes on. One
writer thread stores them in order; while storage does not answer they wait in a bounded in-memory backlog
and are written when it does. What the backlog cannot hold is counted, never dropped silently: the oldest
record goes first, ``records_lost.<kind>`` and ``outbox_dropped.<kind>`` (for the telemetry it carried) are
stored once storage answers, and from there reach ``status``, the birth metrics and the ``drops`` report.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agent.adapters.store import Store
from agent.core.decision import VerifiedDigest
from agent.core.records import DecisionRecord, OutboxMessage
from agent.errors import ImageGuardError

log = logging.getLogger(__name__)

BACKLOG_LIMIT = 10_000
RETRY_MIN_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0
#: attempts before a record that fails for a reason other than storage trouble is given up (and counted)
PERMANENT_ATTEMPTS = 3
LOST = "records_lost."
DROPPED = "outbox_dropped."


@dataclass(frozen=True, slots=True)
class _Write:
    kind: str
    apply: Callable[[Store], None]
    #: kinds of the telemetry messages the record carries (lost with it)
    telemetry: tuple[str, ...] = ()


class Recorder:
    def __init__(self, store: Store, *, limit: int = BACKLOG_LIMIT) -> None:
        self.store = store
        self.limit = limit
        self._backlog: collections.deque[_Write] = collections.deque()
        #: counter increments not yet stored (they are merged, so they never fill the backlog)
        self._counts: dict[str, int] = {}
        #: records lost to a full backlog, not yet stored as counters
        self.lost: dict[str, int] = {}
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        #: why storage does not answer, while it does not
        self.problem: str | None = None
        self.failures = 0
        self._listeners: list[Callable[[DecisionRecord], None]] = []
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    # -- what the enforcer hands over ----------------------------------------------------------------

    def add_listener(self, fn: Callable[[DecisionRecord], None]) -> None:
        """``fn(record)`` for every decision handed over (metrics); keep it short."""
        self._listeners.append(fn)

    def decision(self, record: DecisionRecord, telemetry: Iterable[OutboxMessage] = ()) -> None:
        for listener in self._listeners:
            listener(record)
        messages = tuple(telemetry)
        self._put(
            _Write(
                "decision",
                lambda s: s.record_decision(record, messages),
                tuple(m.kind for m in messages),
            )
        )

    def verified(self, v: VerifiedDigest) -> None:
        self._put(_Write("verified", lambda s: s.add_verified(v)))

    def count(self, name: str, by: int = 1) -> None:
        with self._cond:
            self._counts[name] = self._counts.get(name, 0) + by
            self._cond.notify()

    def _put(self, write: _Write) -> None:
        with self._cond:
            if len(self._backlog) >= self.limit:
                # the oldest record goes, but never the one the writer has in hand (it may yet be stored)
                victim = 1 if self._busy and len(self._backlog) > 1 else 0
                self._lose(self._backlog[victim])
                del self._backlog[victim]
            self._backlog.append(write)
            self._cond.notify()

    def _lose(self, write: _Write) -> None:
        """Count a record that could not be kept (caller holds the condition)."""
        self.lost[write.kind] = self.lost.get(write.kind, 0) + 1
        for kind in write.telemetry:
            self._counts[DROPPED + kind] = self._counts.get(DROPPED + kind, 0) + 1
        self._counts[LOST + write.kind] = self._counts.get(LOST + write.kind, 0) + 1
        if sum(self.lost.values()) in (1, 10, 100) or sum(self.lost.values()) % 1000 == 0:
            log.error(
                "state storage does not answer (%s) and the in-memory backlog is full: %d records lost so "
                "far (%s); enforcement goes on",
                self.problem or "unknown",
                sum(self.lost.values()),
                ", ".join(f"{k} {v}" for k, v in sorted(self.lost.items())),
            )

    # -- state ---------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """For ``status`` (what is not stored yet is only known here)."""
        with self._cond:
            return {
                "state": "ok" if self.problem is None else "failing",
                "problem": self.problem,
                "backlog": len(self._backlog),
                "backlog_limit": self.limit,
                "lost": dict(self.lost),
                "write_failures": self.failures,
            }

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything handed over is stored; False if storage did not answer in time."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._backlog or self._counts or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout: float = 5.0) -> None:
        if not self.flush(timeout):
            with self._cond:
                pending = len(self._backlog)
            if pending:
                log.error(
                    "stopping with %d records that state storage never took (%s); they are lost",
                    pending,
                    self.problem,
                )
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=2)

    # -- the writer ----------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = RETRY_MIN_SECONDS
        attempts = 0
        while True:
            with self._cond:
                while not (self._backlog or self._counts or self._closed):
                    self._cond.wait()
                if self._closed:
                    return
                write = self._backlog[0] if self._backlog else None
                counts = dict(self._counts) if write is None else {}
                self._busy = True
            try:
                if write is not None:
                    write.apply(self.store)
                elif counts:
                    self.store.bump_many(counts)
            except (sqlite3.Error, ImageGuardError, OSError) as exc:
                attempts += 1
                if write is not None and not transient(exc) and attempts >= PERMANENT_ATTEMPTS:
                    # this record can never be stored (not the disk's fault): it must not block the rest
                    log.error("a %s record cannot be stored and is counted as lost: %s", write.kind, exc)
                    with self._cond:
                        self._busy = False
                        if self._backlog and self._backlog[0] is write:
                            self._lose(self._backlog.popleft())
                    attempts = 0
                    continue
                self._failed(exc)
                with self._cond:
                    self._busy = False
                    self._cond.wait(delay)  # close() cuts the wait short
                delay = min(RETRY_MAX_SECONDS, delay * 2)
                continue
            delay = RETRY_MIN_SECONDS
            attempts = 0
            with self._cond:
                self._busy = False
                if write is not None:
                    if self._backlog and self._backlog[0] is write:
                        self._backlog.popleft()
                else:
                    for name, n in counts.items():
                        left = self._counts.get(name, 0) - n
                        if left > 0:
                            self._counts[name] = left
                        else:
                            self._counts.pop(name, None)
                recovered, self.problem = self.problem, None
                self._cond.notify_all()
            if recovered is not None:
                log.warning("state storage answers again (it failed with: %s); backlog written", recovered)

    def _failed(self, exc: BaseException) -> None:
        problem = describe_storage_error(exc, self.store)
        with self._cond:
            first = self.problem is None
            self.problem = problem
            self.failures += 1
            backlog = len(self._backlog)
        if first:
            log.error(
                "cannot write to the state database: %s; enforcement goes on, %d records wait in memory "
                "(up to %d)",
                problem,
                backlog,
                self.limit,
            )
        if self.store.read_only:
            self.store.try_writable()


#: SQLite's primary result codes for trouble that passes: the record waits and is written later
_TRANSIENT = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_PROTOCOL,
    sqlite3.SQLITE_NOMEM,
}


def transient(exc: BaseException) -> bool:
    """Whether a failed write may succeed later (a locked, full or failing disk), or never will."""
    if isinstance(exc, (OSError, ImageGuardError)):
        return True  # ImageGuardError: the store is read-only (full disk) until space is freed
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _TRANSIENT


def describe_storage_error(exc: BaseException, store: Store) -> str:
    """What went wrong with storage, in words an operator can act on."""
    free = store.free_bytes()
    if free is not None and free < 64 * 1024:
        return f"the state filesystem is full ({free} bytes free under {store.state_dir}): {exc}"
    if getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"the state database is locked by another process ({exc})"
    return str(exc)
