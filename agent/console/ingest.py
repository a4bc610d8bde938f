"""The console service's ingest: every device message into the fleet database, exactly once, nothing lost.

* Telemetry (``{account}/+/CONTAINER-AUTH-V1/{kind}``) is taken through an MQTT **shared subscription**
  (``$share/{group}/...``): the broker hands each message to one replica of the console, so replicas add
  throughput without a cluster protocol of their own.
* Lifecycle topics (birth, disconnect, will) are subscribed by every replica without sharing: a shared
  subscription gets no retained messages, and the retained births are how devices that are already online
  are discovered at start. Each replica stores them; the message id makes the second store a no-op.
* The session is persistent (clean session off, a stable client id per replica) and messages are
  acknowledged **after** the transaction that stores them commits (paho ``manual_ack``). A replica that
  dies before committing never acknowledged: the broker sends those messages again when it comes back,
  and the message id turns any repeat into nothing.

What a broker must offer for this (mosquitto 2, EMQX, HiveMQ, VerneMQ all do): shared subscriptions,
persistent sessions that keep QoS 1 messages for a disconnected client, and no per-client queue limit
that drops them (``max_queued_messages`` in mosquitto). The README says so too.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import APP_ID
from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.connection import apply_credentials, broker_address
from agent.adapters.mqtt.topics import DATA_KINDS, LWT_PREFIX, device_message
from agent.config import MqttConfig
from agent.console.client import message_data
from agent.console.fleetdb import FleetDbError, FleetStore, Stored
from agent.errors import BrokerError, PayloadError

log = logging.getLogger(__name__)

SEQ_METRIC = "imageguard.seq"  # agent/runtime/outbox.py
#: the device telemetry the console keeps: DATA_KINDS and the outbox's drop reports
KINDS = (*DATA_KINDS, "drops")
_BATCH = 500
_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    undecodable: int = 0
    db_errors: int = 0
    last_error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "received": self.received,
                "stored": self.stored,
                "duplicates": self.duplicates,
                "undecodable": self.undecodable,
                "db_errors": self.db_errors,
                "last_error": self.last_error,
            }


def decode(
    topic: str, payload: bytes, *, account: str, prefix: str, codec: PayloadCodec, received_ms: int
) -> Stored | None:
    """A message to store, or None when the topic is not one of a device's (pure)."""
    found = device_message(topic, account=account, prefix=prefix, data_kinds=KINDS)
    if found is None:
        return None
    kind, device = found
    if not payload:
        # an empty BIRTH is the retained birth cleared by the device's will or its clean stop. Every one
        # is alike, so its id is its arrival: storing one twice only says "offline" twice.
        return Stored(
            _digest(topic, str(received_ms).encode()),
            device,
            "LWT" if kind == "BIRTH" else kind,
            received_ms,
            None,
            {},
        )
    message = codec.decode(payload)  # PayloadError: the caller counts it
    data = message_data(message)
    seq_metric = message.metrics.get(SEQ_METRIC)
    seq = seq_metric.value if seq_metric is not None and isinstance(seq_metric.value, int) else None
    mid = data.get("id") if kind in KINDS else None
    ident = f"{device}:{mid}" if isinstance(mid, str) and 0 < len(mid) <= 64 else _digest(topic, payload)
    ts = message.timestamp_ms if message.timestamp_ms else received_ms
    return Stored(ident, device, kind, int(ts), seq, data)


def _digest(topic: str, payload: bytes) -> str:
    return "h:" + hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()


class Ingestor:
    """Subscribe, store in batches, acknowledge after commit. :meth:`start` / :meth:`stop`."""

    def __init__(
        self,
        mqtt: MqttConfig,
        store: FleetStore,
        *,
        client_id: str,
        share_group: str,
        replica: str,
        on_stored: Callable[[list[Stored]], None] | None = None,
    ) -> None:
        self.mqtt = mqtt
        self.store = store
        self.client_id = client_id
        self.replica = replica
        self.codec = PayloadCodec.from_config(mqtt)
        self.account, self.prefix = mqtt.account, mqtt.control_prefix
        self.on_stored = on_stored
        self.stats = IngestStats()
        self.filters = [(f"$share/{share_group}/{self.account}/+/{APP_ID}/{k}", 1) for k in KINDS]
        self.filters.append((f"{self.prefix}/{self.account}/+/MQTT/+", 1))
        if self.prefix != LWT_PREFIX:
            self.filters.append((f"{LWT_PREFIX}/{self.account}/+/MQTT/LWT", 1))
        self._queue: queue.Queue[tuple[str, bytes, int, int]] = queue.Queue(20000)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-ingest", daemon=True)
        self._host, self._port, _ = broker_address(mqtt.url)
        v5 = mqtt.protocol == "5"
        self._v5 = v5
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if v5 else False,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            manual_ack=True,
        )
        apply_credentials(c, mqtt)
        c.reconnect_delay_set(1, 30)
        c.max_inflight_messages_set(1000)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._client = c

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, timeout: float = 10.0) -> None:
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0xFFFFFFFF  # keep the session (and its queue) while we are away
        try:
            self._client.connect(
                self._host,
                self._port,
                keepalive=self.mqtt.keepalive_seconds,
                clean_start=False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot reach the broker at {self.mqtt.url}: {exc}") from None
        self._thread.start()
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise BrokerError(
                f"broker {self.mqtt.url} did not accept the console's ingest within {timeout:g}s"
            )

    def stop(self) -> None:
        """Stop taking messages; what was received and not stored stays unacknowledged (the broker keeps it)."""
        self._stop.set()
        self._client.disconnect()
        self._client.loop_stop()
        if self._thread.is_alive():
            self._thread.join(10)

    # paho's network thread
    def _on_connect(self, c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("console ingest: the broker refused the connection: %s", reason)
            return
        c.subscribe(self.filters)
        self._connected.set()
        log.info("console ingest: connected to %s as %s", self.mqtt.url, self.client_id)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("console ingest: disconnected (%s); reconnecting", reason)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        # blocks paho when the writer is behind: the broker then holds the rest (back-pressure, no loss)
        self._queue.put((msg.topic, bytes(msg.payload), msg.mid, msg.qos))

    # the writer thread
    def _run(self) -> None:
        attempt = 0
        pending: list[tuple[str, bytes, int, int]] = []
        while not self._stop.is_set():
            if not pending:
                try:
                    pending.append(self._queue.get(timeout=0.2))
                except queue.Empty:
                    continue
                while len(pending) < _BATCH:
                    try:
                        pending.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
            try:
                self._store(pending)
            except FleetDbError as exc:
                self.stats.add(db_errors=1)
                self.stats.last_error = exc.message
                if attempt == 0:
                    log.error("console ingest: %s; retrying (nothing is acknowledged meanwhile)", exc)
                self._stop.wait(_RETRY_SECONDS[min(attempt, len(_RETRY_SECONDS) - 1)])
                attempt += 1
                continue
            if attempt:
                log.info("console ingest: the database answers again")
            attempt = 0
            for _topic, _payload, mid, qos in pending:
                if qos:
                    self._client.ack(mid, qos)
            pending = []

    def _store(self, raw: list[tuple[str, bytes, int, int]]) -> None:
        now_ms = int(time.time() * 1000)
        batch: list[Stored] = []
        undecodable = 0
        for topic, payload, _mid, _qos in raw:
            try:
                stored = decode(
                    topic,
                    payload,
                    account=self.account,
                    prefix=self.prefix,
                    codec=self.codec,
                    received_ms=now_ms,
                )
            except PayloadError as exc:
                undecodable += 1
                log.warning("console ingest: undecodable message on %s dropped: %s", topic, exc)
                continue
            if stored is not None:
                batch.append(stored)
        new = self.store.store_messages(batch, self.replica) if batch else 0
        self.stats.add(received=len(raw), stored=new, duplicates=len(batch) - new, undecodable=undecodable)
        if self.on_stored is not None and batch:
            try:
                self.on_stored(batch)
            except Exception:
                log.exception("console ingest: a listener failed")
