"""The outbox drainer: publishes queued telemetry oldest first at QoS 1, deletes a row only after PUBACK.

Delivery is at-least-once. A row is deleted only once the broker acknowledged it, so nothing is lost when the
broker is away or the agent stops or crashes; a message whose PUBACK arrived just before a crash (row not yet
deleted) goes out again after the restart, so consumers dedupe by the message ``id``. A clean stop waits for
outstanding acknowledgements first, so a SIGTERM does not cause duplicates.

Order: rows are published in ``seq`` order through a bounded window of in-flight messages; paho sends them
in that order and re-sends unacknowledged ones in order after a reconnect. A row whose publish failed while
the connection kept running (rare: the broker refused it) is published again on the next pass.

The drainer sleeps on an event that is set when the store commits new telemetry, when a publish completes
and when the connection comes up; a slow timer (``fallback_seconds``) covers changes made by another process
(the CLI). When the full outbox dropped messages (``outbox_dropped.<kind>`` counters, see
:meth:`agent.adapters.store.Store.enqueue`), one message on ``.../drops`` reports how many since the last report
(schemas/control/drops.telemetry.schema.json); the report is itself acknowledged before it counts as sent.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Protocol

from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.connection import PublishHandle
from agent.adapters.mqtt.kurapayload import KuraMessage, MetricValue
from agent.adapters.mqtt.topics import Topics
from agent.adapters.store import QueuedMessage, Store
from agent.core.records import new_id, utc_now
from agent.errors import BrokerError, PayloadError, PublishWindowFull

log = logging.getLogger(__name__)

DROPPED = "outbox_dropped."
REPORTED = "outbox_drops_reported."
#: records enforcement could not store at all (agent/runtime/recorder.py)
LOST = "records_lost."
DROPS_TOPIC = "drops"
SEQ_METRIC = "imageguard.seq"
_MAX_METRIC_TEXT = 1024


class Publisher(Protocol):
    """The part of :class:`agent.adapters.mqtt.connection.MqttConnection` the drainer uses."""

    @property
    def is_connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishHandle: ...


def _timestamp_ms(text: Any) -> int:
    if isinstance(text, str):
        try:
            return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
        except ValueError:
            pass
    return int(time.time() * 1000)


def telemetry_message(message: Mapping[str, Any], seq: int | None = None) -> KuraMessage:
    """A KuraPayload for one telemetry message: its time, its top-level scalar fields as metrics (so a
    Kura-aware consumer can filter without parsing), and the whole JSON document as the body. ``seq`` (the
    outbox row, increasing per device) becomes the ``imageguard.seq`` metric: consumers that receive one
    device's messages out of order (shared subscriptions) restore its order with it."""
    metrics: dict[str, MetricValue] = {}
    if seq is not None:
        metrics[SEQ_METRIC] = MetricValue.int64(seq)
    for key, value in message.items():
        if isinstance(value, bool):
            metrics[key] = MetricValue.boolean(value)
        elif isinstance(value, int) and -(2**63) <= value < 2**63:
            metrics[key] = MetricValue.int64(value)
        elif isinstance(value, str):
            metrics[key] = MetricValue.string(value[:_MAX_METRIC_TEXT])
    container = message.get("container")
    if isinstance(container, Mapping):
        for key in ("id", "name"):
            if isinstance(container.get(key), str):
                metrics[f"container.{key}"] = MetricValue.string(container[key])
    body = json.dumps(message, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return KuraMessage(timestamp_ms=_timestamp_ms(message.get("time")), metrics=metrics, body=body)


@dataclass
class DrainStats:
    published: int = 0
    acked: int = 0
    #: publishes that completed without an acknowledgement while the connection kept running (re-sent)
    failed: int = 0
    #: rows that can never be published (unencodable); deleted and counted as ``outbox_undeliverable``
    undeliverable: int = 0
    drop_reports: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, by: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + by)

    def to_dict(self) -> dict[str, int]:
        with self._lock:
            return {
                k: getattr(self, k) for k in ("published", "acked", "failed", "undeliverable", "drop_reports")
            }


class OutboxDrainer:
    def __init__(
        self,
        store: Store,
        topics: Topics,
        codec: PayloadCodec,
        connection: Publisher,
        *,
        device: str,
        policy_version: Callable[[], int] = lambda: 0,
        window: int = 64,
        fallback_seconds: float = 5.0,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.store = store
        self.topics = topics
        self.codec = codec
        self.connection = connection
        self.device = device
        self.policy_version = policy_version
        self.window = window
        self.fallback_seconds = fallback_seconds
        self.stats = DrainStats()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._cursor = 0  # highest seq handed to the connection in order
        self._inflight: dict[int, PublishHandle] = {}
        self._acked: list[int] = []  # acknowledged, not yet deleted
        self._retry_from: int | None = None
        self._report: PublishHandle | None = None
        self._report_delta: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)

    # --- control ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._wake.set()  # a first pass: rows left by the previous run
        self._thread.start()

    def wake(self) -> None:
        """New rows, a reconnect, or a completed publish: look at the outbox again."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop publishing; rows acknowledged so far are deleted. Call :meth:`flush` again after the
        connection stopped (it waits for outstanding acknowledgements)."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.flush()

    def status(self) -> dict[str, Any]:
        with self._lock:
            in_flight = len(self._inflight)
        return {"in_flight": in_flight, **self.stats.to_dict()}

    def wait_idle(self, timeout: float) -> bool:
        """True once the outbox is empty and nothing is in flight (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self._inflight or self._acked)
            if not busy and self.store.outbox_size() == 0:
                return True
            time.sleep(0.02)
        return False

    # --- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.fallback_seconds)
            self._wake.clear()
            try:
                self.flush()
                if self._stopping.is_set() or not self.connection.is_connected:
                    continue
                self._report_drops()
                self._publish_more()
            except Exception:  # the store or the connection failed: keep the thread, try again later
                log.exception(
                    "telemetry: draining the outbox failed; retrying in %.0fs", self.fallback_seconds
                )
                self._stopping.wait(self.fallback_seconds)

    def flush(self) -> None:
        """Delete acknowledged rows and count acknowledged drop reports (drainer thread, or after stop)."""
        with self._lock:
            acked, self._acked = self._acked, []
            report, delta = self._report, self._report_delta
            if report is not None and report.done():
                self._report, self._report_delta = None, {}
        if acked:
            try:
                self.store.outbox_ack(acked)
            except Exception:  # storage trouble: the rows stay acknowledged here and are deleted later
                with self._lock:
                    self._acked[:0] = acked
                raise
        if report is not None and report.done():
            if report.acked:
                for kind, n in delta.items():
                    self.store.bump(REPORTED + kind, n)
                self.stats.add("drop_reports")
            else:
                self.stats.add("failed")

    def _publish_more(self) -> None:
        with self._lock:
            if self._retry_from is not None:
                self._cursor = min(self._cursor, self._retry_from - 1)
                self._retry_from = None
            room = self.window - len(self._inflight)
            cursor = self._cursor
        while room > 0 and not self._stopping.is_set():
            rows = self.store.outbox_peek(limit=room, after_seq=cursor)
            if not rows:
                return
            for row in rows:
                with self._lock:
                    skip = row.seq in self._inflight or row.seq in self._acked
                if not skip:
                    if not self._publish_row(row):
                        return  # window full or connection gone: the cursor stays before this row
                    room -= 1
                cursor = row.seq
                with self._lock:
                    self._cursor = max(self._cursor, cursor)

    def _publish_row(self, row: QueuedMessage) -> bool:
        try:
            topic = row.topic or self.topics.data(row.kind)  # type: ignore[arg-type]
            payload = self.codec.encode(telemetry_message(row.message, row.seq))
        except (ValueError, PayloadError) as exc:
            log.error(
                "telemetry: outbox row %d (%s) cannot be published and is dropped: %s", row.seq, row.kind, exc
            )
            self.stats.add("undeliverable")
            self.store.outbox_ack([row.seq])
            self.store.bump("outbox_undeliverable")
            return True
        try:
            handle = self.connection.publish(topic, payload, qos=1)
        except PublishWindowFull:
            return False
        except BrokerError as exc:
            log.debug("telemetry: publish deferred: %s", exc)
            return False
        with self._lock:
            self._inflight[row.seq] = handle
        self.stats.add("published")
        handle.add_done_callback(partial(self._done, row.seq))
        return True

    def _done(self, seq: int, handle: PublishHandle) -> None:
        """Runs on paho's thread: only bookkeeping here; the drainer thread touches the store."""
        with self._lock:
            self._inflight.pop(seq, None)
            if handle.acked:
                self._acked.append(seq)
            elif not self._stopping.is_set():
                self._retry_from = seq if self._retry_from is None else min(self._retry_from, seq)
        if handle.acked:
            self.stats.add("acked")
        elif not self._stopping.is_set():
            self.stats.add("failed")
            log.warning(
                "telemetry: publish of outbox row %d failed (%s); it will be sent again", seq, handle.error
            )
        self._wake.set()

    # --- drop reports ----------------------------------------------------------------------------

    def pending_drops(self) -> dict[str, int]:
        """Messages dropped by the full outbox and not yet reported, per kind."""
        counters = self.store.counters()
        out = {}
        for name, total in counters.items():
            if name.startswith(DROPPED):
                kind = name.removeprefix(DROPPED)
                if (delta := total - counters.get(REPORTED + kind, 0)) > 0:
                    out[kind] = delta
        return out

    def _report_drops(self) -> None:
        with self._lock:
            if self._report is not None:
                return
        delta = self.pending_drops()
        if not delta:
            return
        counters = self.store.counters()
        message = {
            "id": new_id(),
            "time": utc_now(),
            "device": self.device,
            "dropped": delta,
            "total": {k.removeprefix(DROPPED): v for k, v in counters.items() if k.startswith(DROPPED)},
            "policy_version": self.policy_version(),
        }
        lost = {k.removeprefix(LOST): v for k, v in counters.items() if k.startswith(LOST)}
        if lost:
            message["records_lost"] = lost
        topic = f"{self.topics.account}/{self.topics.device_id}/{self.topics.app_id}/{DROPS_TOPIC}"
        try:
            handle = self.connection.publish(topic, self.codec.encode(telemetry_message(message)), qos=1)
        except BrokerError:
            return
        log.warning("telemetry: the full outbox dropped %s; reported on %s", delta, topic)
        with self._lock:
            self._report, self._report_delta = handle, delta
        handle.add_done_callback(lambda _h: self._wake.set())
