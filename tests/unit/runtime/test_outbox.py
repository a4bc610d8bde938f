"""The outbox drainer's bookkeeping against a recording publisher (the real broker is in
tests/integration/test_cloud_*.py): order, window, delete-after-ack, re-send of failures, drop reports."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.connection import PublishHandle
from agent.adapters.mqtt.kurapayload import MetricType
from agent.adapters.mqtt.topics import Topics
from agent.adapters.store import Store
from agent.core.records import PRIORITY_ALERT, PRIORITY_ALLOWED_VERDICT, OutboxMessage
from agent.core.schemas import validate
from agent.errors import PublishWindowFull
from agent.runtime.outbox import OutboxDrainer, telemetry_message

T = Topics(account="acme", device_id="dev-1")
CODEC = PayloadCodec(encoding="json")


class Recorder:
    """Records publishes; the test decides when (and whether) the broker acknowledges each."""

    def __init__(self, limit: int = 1000) -> None:
        self.connected = True
        self.limit = limit
        self.handles: list[tuple[str, bytes, PublishHandle]] = []
        self.lock = threading.Lock()

    @property
    def is_connected(self) -> bool:
        return self.connected

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishHandle:
        with self.lock:
            if sum(1 for *_, h in self.handles if not h.done()) >= self.limit:
                raise PublishWindowFull("full")
            handle = PublishHandle(topic, qos)
            self.handles.append((topic, payload, handle))
            return handle

    def ids(self) -> list[str]:
        with self.lock:
            return [json.loads(CODEC.decode(p).body or b"")["id"] for _, p, _ in self.handles]

    def pending(self) -> list[PublishHandle]:
        with self.lock:
            return [h for *_, h in self.handles if not h.done()]


def wait(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state", outbox_limit=5)
    yield s
    s.close()


def queue(store: Store, n: int, kind: str = "alerts", priority: int = PRIORITY_ALERT, start: int = 0) -> None:
    store.outbox_add(
        [
            OutboxMessage(kind, {"id": f"m{start + i}", "time": "2024-05-01T10:00:00.000Z"}, priority)
            for i in range(n)
        ],
        "2024-05-01T10:00:00.000Z",
    )


def drainer(store: Store, rec: Recorder, **kw: object) -> OutboxDrainer:
    d = OutboxDrainer(store, T, CODEC, rec, device="dev-1", policy_version=lambda: 7, **kw)  # type: ignore[arg-type]
    store.add_outbox_listener(d.wake)
    return d


def test_telemetry_message_metrics_and_body() -> None:
    record = {
        "id": "abc",
        "time": "2024-05-01T10:00:00.250Z",
        "verdict": "blocked",
        "policy_version": 3,
        "container": {"id": "c1", "name": "web"},
        "digests": ["sha256:" + "1" * 64],
        "matched": None,
        "dry": False,
    }
    msg = telemetry_message(record)
    assert msg.timestamp_ms == 1714557600250
    assert json.loads(msg.body or b"") == record
    assert msg.metrics["policy_version"].type is MetricType.INT64
    assert msg.metrics["dry"].type is MetricType.BOOL
    assert msg.string("verdict") == "blocked" and msg.string("container.name") == "web"
    assert "digests" not in msg.metrics and "matched" not in msg.metrics


def test_ordered_windowed_and_deleted_only_after_ack(store: Store) -> None:
    store.outbox_limit = 100
    queue(store, 10)
    rec = Recorder()
    d = drainer(store, rec, window=4, fallback_seconds=60)
    d.start()
    try:
        wait(lambda: len(rec.handles) == 4)
        time.sleep(0.05)
        assert len(rec.handles) == 4  # the window holds
        rec.handles[1][2]._resolve(True)  # an ack out of order deletes that row only
        wait(lambda: len(rec.handles) == 5)
        wait(lambda: store.outbox_size() == 9)
        assert [m.message["id"] for m in store.outbox_peek(100)][:2] == ["m0", "m2"]
        while len(rec.ids()) < 10 or rec.pending():
            for h in rec.pending():
                h._resolve(True)
            time.sleep(0.01)
        assert d.wait_idle(5)
        assert rec.ids() == [f"m{i}" for i in range(10)]
        assert {t for t, _, _ in rec.handles} == {"acme/dev-1/CONTAINER-AUTH-V1/alerts"}
    finally:
        d.stop()


def test_offline_waits_and_reconnect_wakes(store: Store) -> None:
    queue(store, 3)
    rec = Recorder()
    rec.connected = False
    d = drainer(store, rec, fallback_seconds=60)
    d.start()
    try:
        time.sleep(0.1)
        assert rec.handles == []
        rec.connected = True
        d.wake()  # what the connection's on_connected hook does
        wait(lambda: len(rec.handles) == 3)
    finally:
        d.stop()
    assert store.outbox_size() == 3  # never acknowledged: still queued for the next start


def test_new_rows_wake_the_drainer_without_polling(store: Store) -> None:
    rec = Recorder()
    d = drainer(store, rec, fallback_seconds=60)
    d.start()
    try:
        time.sleep(0.05)
        queue(store, 1)
        wait(lambda: len(rec.handles) == 1, timeout=2)
    finally:
        d.stop()


def test_failed_publish_is_sent_again_and_kept_until_acked(store: Store) -> None:
    queue(store, 3)
    rec = Recorder()
    d = drainer(store, rec, fallback_seconds=60)
    d.start()
    try:
        wait(lambda: len(rec.handles) == 3)
        rec.handles[0][2]._resolve(False, "refused")
        wait(lambda: len(rec.handles) == 4)
        assert rec.ids()[3] == "m0"
        assert store.outbox_size() == 3
        for h in rec.pending():
            h._resolve(True)
        assert d.wait_idle(5)
        assert sorted(set(rec.ids())) == ["m0", "m1", "m2"]
    finally:
        d.stop()


def test_window_full_at_the_connection_is_retried(store: Store) -> None:
    queue(store, 4)
    rec = Recorder(limit=2)
    d = drainer(store, rec, fallback_seconds=60)
    d.start()
    try:
        wait(lambda: len(rec.handles) == 2)
        for h in rec.pending():
            h._resolve(True)
        wait(lambda: len(rec.handles) == 4)
        for h in rec.pending():
            h._resolve(True)
        assert d.wait_idle(5)
        assert rec.ids() == ["m0", "m1", "m2", "m3"]
    finally:
        d.stop()


def test_drops_are_reported_once(store: Store) -> None:
    queue(store, 5, "verdicts", PRIORITY_ALLOWED_VERDICT)
    queue(store, 2, "alerts", PRIORITY_ALERT, start=5)  # the full outbox drops two allowed verdicts
    assert store.counters()["outbox_dropped.verdicts"] == 2
    rec = Recorder()
    d = drainer(store, rec, fallback_seconds=60)
    d.start()
    try:
        wait(lambda: len(rec.handles) >= 1)
        topic, payload, handle = rec.handles[0]
        assert topic == "acme/dev-1/CONTAINER-AUTH-V1/drops"
        report = json.loads(CODEC.decode(payload).body or b"")
        validate(report, "control/drops.telemetry", "drop report")
        assert report["dropped"] == {"verdicts": 2} and report["policy_version"] == 7
        assert d.pending_drops() == {"verdicts": 2}
        handle._resolve(True)
        d.wake()
        wait(lambda: d.pending_drops() == {})
        while rec.pending() or store.outbox_size():
            for h in rec.pending():
                h._resolve(True)
            time.sleep(0.01)
        time.sleep(0.05)
        reports = [t for t, _, _ in rec.handles if t.endswith("/drops")]
        assert len(reports) == 1
    finally:
        d.stop()
