"""The recorder: enforcement hands records over and goes on; storage trouble fills a bounded backlog, and
what does not fit is counted where status and the drops report read it."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.adapters.store import Store
from agent.runtime.recorder import Recorder
from tests.unit.adapters.test_store import msg, record


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state", busy_timeout=0.05)
    yield s
    s.close()


class WriteLock:
    """Another process's write transaction on the same database file."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.db.execute("ROLLBACK")
        self.db.close()


def wait_until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_records_wait_in_memory_while_the_database_is_locked(store: Store) -> None:
    lock = WriteLock(store.path)
    rec = Recorder(store)
    try:
        rec.decision(record(1, "blocked"), [msg("alerts", 0, 1)])
        rec.count("retries")
        wait_until(lambda: rec.stats()["state"] == "failing")
        stats = rec.stats()
        assert stats["backlog"] == 1 and "locked by another process" in stats["problem"]
        assert store.decision_count() == 0  # reads still answer while the write waits
        lock.release()
        assert rec.flush(5)
        assert rec.stats()["state"] == "ok"
        assert store.decision_count() == 1 and store.outbox_size() == 1
        assert store.counters()["retries"] == 1
    finally:
        rec.close()


def test_what_the_full_backlog_cannot_hold_is_counted_never_dropped_silently(store: Store) -> None:
    lock = WriteLock(store.path)
    rec = Recorder(store, limit=3)
    try:
        for i in range(5):
            rec.decision(record(i, "blocked"), [msg("alerts", 0, i)])
        assert rec.stats()["lost"] == {"decision": 2}
        lock.release()
        assert rec.flush(5)
    finally:
        rec.close()
    counters = store.counters()
    assert counters["records_lost.decision"] == 2
    assert counters["outbox_dropped.alerts"] == 2  # the drops report counts the telemetry they carried
    stored = sorted(r["id"] for _, r in store.decisions())
    assert len(stored) == 3 and "dec-4" in stored  # the oldest went (but not one being written)


def test_a_record_that_can_never_be_stored_does_not_block_the_rest(store: Store) -> None:
    rec = Recorder(store)
    try:
        rec.decision(record(1))
        assert rec.flush(5)
        db = sqlite3.connect(store.path)
        db.execute("DROP TABLE decisions")  # a write that can only fail from now on
        db.commit()
        db.close()
        rec.decision(record(2))
        rec.count("engine_errors")
        assert rec.flush(10), "given up after a few attempts, then the counters were written"
    finally:
        rec.close()
    assert rec.stats()["lost"] == {"decision": 1}
    counters = store.counters()
    assert counters["records_lost.decision"] == 1 and counters["engine_errors"] == 1
