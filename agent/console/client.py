"""The cloud side of the Kura model: what ``imageguard console`` does, as a library.

* :class:`ConsoleClient` - the console's MQTT client (paho, clean session, no birth certificate). Its broker
  client id is the console id plus a random suffix, so two console commands never kick each other off;
  ``requester.client.id`` (which names the reply topic) is the console id itself.
* :meth:`Console.request` - one Kura request/response round trip.
* :meth:`Console.rollout` - publish a retained fleet layer and collect the devices' acknowledgements
  (:class:`RolloutTracker`, pure).
* :meth:`Console.stream` - telemetry and lifecycle events (:func:`parse_event`, pure).
* :class:`DeviceRegistry` - devices seen in birth / disconnect certificates, optionally kept in a JSON file so
  that a later command knows devices that came online before it started (births are not retained).
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent import APP_ID
from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.connection import apply_credentials, broker_address
from agent.adapters.mqtt.kurapayload import KuraMessage, MetricValue
from agent.adapters.mqtt.requests import REQUEST_ID, REQUESTER, RESPONSE_CODE, RESPONSE_MESSAGE
from agent.adapters.mqtt.topics import DATA_KINDS, LWT_PREFIX, Topics, device_message, valid_level
from agent.config import Config, MqttConfig
from agent.core.envelope import claimed_version
from agent.core.policy import group_layer
from agent.errors import BrokerError, ConfigError, InputError, PayloadError, ReplyTimeout

log = logging.getLogger(__name__)

LIFECYCLE = ("BIRTH", "DC", "LWT", "APPS")
_QUEUE_BOUND = 10000


# --- replies and exit codes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    code: int
    body: bytes | None
    message: str | None = None

    def document(self) -> Any:
        """The body as JSON, else as text, else None."""
        if not self.body:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return self.body.decode("utf-8", "replace")


def exit_code_for(code: int) -> int:
    """``console request`` exit code: 0 for 200, 2 for 400/403 (the request was refused), 1 otherwise."""
    if code == 200:
        return 0
    return 2 if code in (400, 403) else 1


# --- events (pure) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """A telemetry (``verdicts|alerts|policy|instances``) or lifecycle (``BIRTH|DC|LWT|APPS``) message."""

    kind: str
    device: str
    topic: str
    data: Mapping[str, Any]


def message_data(message: KuraMessage) -> dict[str, Any]:
    """A JSON object body if there is one, else the metrics as plain values."""
    if message.body:
        try:
            doc = json.loads(message.body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            return doc
    return {name: value.value for name, value in message.metrics.items()}


def parse_event(
    topic: str, payload: bytes, *, account: str, prefix: str, codec: PayloadCodec
) -> Event | None:
    """An :class:`Event` for a data or lifecycle topic of ``account``; None for anything else or garbage."""
    found = device_message(topic, account=account, prefix=prefix)
    if found is None:
        return None
    kind, device = found
    if not payload:
        # an empty BIRTH is the device's retained birth being cleared: its will fired or it stopped
        return Event("LWT" if kind == "BIRTH" else kind, device, topic, {})
    try:
        data = message_data(codec.decode(payload))
    except PayloadError as exc:
        log.warning("console: undecodable message on %s: %s", topic, exc)
        return None
    return Event(kind, device, topic, data)


# --- devices (pure, plus an optional JSON file) --------------------------------------------------------


@dataclass
class DeviceState:
    device: str
    online: bool
    groups: tuple[str, ...] = ()
    display_name: str = ""
    policy_version: str = ""
    last_seen: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), groups=list(self.groups))


class DeviceRegistry:
    """Devices seen in lifecycle certificates. With ``path``, loaded from and saved to a JSON file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.devices: dict[str, DeviceState] = {}
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            for d in doc.get("devices", []):
                state = DeviceState(
                    device=str(d["device"]),
                    online=bool(d["online"]),
                    groups=tuple(str(g) for g in d.get("groups", [])),
                    display_name=str(d.get("display_name", "")),
                    policy_version=str(d.get("policy_version", "")),
                    last_seen=float(d.get("last_seen", 0.0)),
                )
                self.devices[state.device] = state
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("console: ignoring unreadable device registry %s: %s", path, exc)

    def save(self) -> None:
        if self.path is None:
            return
        doc = {"devices": [s.to_dict() for s in sorted(self.devices.values(), key=lambda s: s.device)]}
        try:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("console: cannot save the device registry %s: %s", self.path, exc.strerror)

    def observe(self, event: Event, now: float | None = None) -> bool:
        """Update from a lifecycle event; True if it changed what we know."""
        if event.kind not in LIFECYCLE:
            return False
        now = time.time() if now is None else now
        state = self.devices.get(event.device) or DeviceState(event.device, online=False)
        before = (state.online, state.groups)
        if event.kind in ("BIRTH", "APPS"):
            state.online = True
            groups = str(event.data.get("imageguard_groups", ""))
            state.groups = tuple(g for g in groups.split(",") if g)
            state.display_name = str(event.data.get("display_name", state.display_name))
            state.policy_version = str(event.data.get("imageguard_policy_version", state.policy_version))
        else:  # DC, LWT
            state.online = False
        state.last_seen = now
        new = event.device not in self.devices
        self.devices[event.device] = state
        return new or before != (state.online, state.groups)

    def members(self, group: str) -> list[str]:
        """Online devices whose last birth listed ``group``."""
        return sorted(s.device for s in self.devices.values() if s.online and group in s.groups)


# --- rollout progress (pure) -------------------------------------------------------------------------

FINAL = ("applied", "unchanged", "rejected")


@dataclass
class AckRow:
    device: str
    status: str = "no answer"  # applied | unchanged | rejected | no answer | offline
    version: int | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RolloutTracker:
    """Who must acknowledge layer ``group:G`` version V, and who did.

    Expected devices: those named up front (``expected``: ``--device`` and online group members from the
    registry), members whose birth arrives during the rollout, and any device that acknowledges (births are
    not retained, so an online member may be known only by its acknowledgement). The rollout is complete
    when at least ``expect_count`` devices are known, every known device that is not offline has a final
    answer, and no new device appeared for ``settle`` seconds.
    """

    group: str
    version: int
    expected: Iterable[str] = ()
    expect_count: int = 0
    settle: float = 1.0
    rows: dict[str, AckRow] = field(default_factory=dict)
    #: the published layer was taken off the broker again (devices hold a newer one)
    withdrawn: bool = False
    _changed_at: float = float("-inf")

    def __post_init__(self) -> None:
        for device in self.expected:
            self.rows.setdefault(device, AckRow(device))

    def begin(self, now: float | None = None) -> None:
        """The layer was published: stragglers get ``settle`` seconds from now."""
        self._changed_at = time.monotonic() if now is None else now

    @property
    def layer(self) -> str:
        return group_layer(self.group)

    def observe(self, event: Event, now: float | None = None) -> bool:
        """Take one event; True if the progress changed."""
        now = time.monotonic() if now is None else now
        row = self.rows.get(event.device)
        if event.kind in ("BIRTH", "APPS"):
            groups = str(event.data.get("imageguard_groups", "")).split(",")
            if self.group in groups and row is None:
                self.rows[event.device] = AckRow(event.device)
                self._changed_at = now
                return True
            return False
        if event.kind in ("DC", "LWT"):
            if row is not None and row.status not in FINAL:
                row.status = "offline"
                return True
            return False
        if event.kind != "policy" or event.data.get("layer") != self.layer:
            return False
        if event.data.get("version") != self.version or event.data.get("status") not in FINAL:
            return False
        if row is None:
            row = self.rows[event.device] = AckRow(event.device)
            self._changed_at = now
        row.status = str(event.data["status"])
        row.version = self.version
        row.reason = str(event.data.get("reason") or "")
        if row.status == "rejected" and event.data.get("detail"):
            row.reason = f"{row.reason}: {event.data['detail']}" if row.reason else str(event.data["detail"])
        return True

    @property
    def answered(self) -> int:
        return sum(r.status in FINAL for r in self.rows.values())

    def complete(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if len(self.rows) < max(1, self.expect_count):
            return False
        waiting = [r for r in self.rows.values() if r.status == "no answer"]
        return not waiting and now - self._changed_at >= self.settle

    @property
    def ok(self) -> bool:
        """Every known device holds the version (applied now, or already held: unchanged)."""
        return bool(self.rows) and all(r.status in ("applied", "unchanged") for r in self.rows.values())

    def table(self) -> list[AckRow]:
        return [self.rows[d] for d in sorted(self.rows)]


# --- the MQTT adapter --------------------------------------------------------------------------------


class ConsoleClient:
    """The console's paho client: connect, subscribe (waits for SUBACK), publish (waits for PUBACK).

    Every message on a subscription lands in :attr:`messages` (bounded; paho's thread waits when full).
    """

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        *,
        on_message: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.config = config
        self.client_id = client_id
        #: when given, messages go to it (on paho's thread) instead of :attr:`messages`
        self.on_message = on_message
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue(_QUEUE_BOUND)
        self._host, self._port, _ = broker_address(config.url)
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self._subacks: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        v5 = config.protocol == "5"
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{client_id}-{uuid.uuid4().hex[:8]}",
            clean_session=None if v5 else True,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        )
        apply_credentials(c, config)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self._client = c

    def __enter__(self) -> ConsoleClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def connect(self, timeout: float = 10.0) -> None:
        try:
            self._client.connect(self._host, self._port, keepalive=self.config.keepalive_seconds)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot reach the broker at {self.config.url}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(timeout) or self._connect_error:
            self.close()
            why = self._connect_error or f"no CONNACK within {timeout:g}s"
            raise BrokerError(f"broker {self.config.url} refused the console: {why}")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> None:
        done = threading.Event()
        with self._lock:
            rc, mid = self._client.subscribe(topic_filter, qos)
            if rc != paho.MQTT_ERR_SUCCESS or mid is None:
                raise BrokerError(f"cannot subscribe to {topic_filter}: {paho.error_string(rc)}")
            self._subacks[mid] = done
        if not done.wait(timeout):
            raise BrokerError(f"no SUBACK for {topic_filter} within {timeout:g}s")

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._client.unsubscribe(topic_filter)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float = 10
    ) -> None:
        try:
            info = self._client.publish(topic, payload, qos, retain)
            info.wait_for_publish(timeout)
        except (ValueError, RuntimeError) as exc:
            raise BrokerError(f"cannot publish to {topic}: {exc}") from None
        if not info.is_published():
            raise BrokerError(f"the broker did not acknowledge the publish to {topic} within {timeout:g}s")

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        """Queue a publish without waiting for its PUBACK (many requests in flight at once); a failure to
        queue it raises, a message the broker never takes shows as the caller's reply timeout."""
        try:
            info = self._client.publish(topic, payload, qos)
        except (ValueError, RuntimeError) as exc:
            raise BrokerError(f"cannot publish to {topic}: {exc}") from None
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):  # NO_CONN: sent on reconnect
            raise BrokerError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")

    def next_message(self, timeout: float) -> tuple[str, bytes] | None:
        try:
            return self.messages.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    # paho's network thread
    def _on_connect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
        self._connected.set()

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        with self._lock:
            done = self._subacks.pop(mid, None)
        if any(r.is_failure for r in reasons):
            log.error("console: the broker refused a subscription: %s", reasons)
        if done is not None:
            done.set()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if self.on_message is not None:
            self.on_message(msg.topic, bytes(msg.payload))
            return
        self.messages.put((msg.topic, bytes(msg.payload)))


# --- operations --------------------------------------------------------------------------------------


def _levels(resource: str) -> tuple[str, ...]:
    levels = tuple(resource.strip("/").split("/"))
    if not resource.strip("/") or not all(valid_level(s) for s in levels):
        raise InputError(f"resource {resource!r}: expected levels like 'allowlist/sha256:...' (no + or #)")
    return levels


class Console:
    """The console's operations. ``client`` must be connected (:meth:`ConsoleClient.connect`)."""

    def __init__(self, config: Config, client: ConsoleClient) -> None:
        if config.mqtt is None:
            raise ConfigError(f"configuration {config.source}: the console needs an [mqtt] section")
        self.mqtt = config.mqtt
        self.console_id = config.device.id
        self.client = client
        self.codec = PayloadCodec.from_config(config.mqtt)
        self.account, self.prefix = config.mqtt.account, config.mqtt.control_prefix

    def _topics(self, client_id: str) -> Topics:
        try:
            return Topics(self.account, client_id, control_prefix=self.prefix)
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def request(
        self, device: str, method: str, resource: str, body: bytes | None = None, timeout: float = 10.0
    ) -> Reply:
        """Send one request and wait for its reply. Raises ReplyTimeout."""
        method = method.upper()
        topic = self._topics(device).request(method, *_levels(resource))
        request_id = uuid.uuid4().hex
        reply_topic = self._topics(self.console_id).reply(self.console_id, request_id)
        self.client.subscribe(reply_topic, qos=1)
        metrics = {REQUEST_ID: MetricValue.string(request_id), REQUESTER: MetricValue.string(self.console_id)}
        message = KuraMessage(timestamp_ms=int(time.time() * 1000), metrics=metrics, body=body)
        self.client.publish(topic, self.codec.encode(message), qos=1)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            got = self.client.next_message(remaining)
            if got is None or got[0] != reply_topic:
                continue
            try:
                reply = self.codec.decode(got[1])
            except PayloadError as exc:
                raise BrokerError(f"{device} sent an undecodable reply: {exc}") from None
            code = reply.integer(RESPONSE_CODE)
            if code is None:
                raise BrokerError(f"{device}'s reply has no {RESPONSE_CODE} metric")
            return Reply(code, reply.body, reply.string(RESPONSE_MESSAGE))
        raise ReplyTimeout(
            f"no reply from {device} to {method} {resource} within {timeout:g}s: is the device online, "
            f"is its id right, and may this console publish to {topic}?"
        )

    def subscribe_events(self, *, telemetry: Sequence[str] = DATA_KINDS, lifecycle: bool = True) -> None:
        for kind in telemetry:
            self.client.subscribe(f"{self.account}/+/{APP_ID}/{kind}", qos=1)
        if lifecycle:
            self.client.subscribe(f"{self.prefix}/{self.account}/+/MQTT/#", qos=1)
            if self.prefix != LWT_PREFIX:
                self.client.subscribe(f"{LWT_PREFIX}/{self.account}/+/MQTT/LWT", qos=1)

    def next_event(self, timeout: float) -> Event | None:
        got = self.client.next_message(timeout)
        if got is None:
            return None
        return parse_event(got[0], got[1], account=self.account, prefix=self.prefix, codec=self.codec)

    def stream(
        self, on_event: Callable[[Event], None], *, duration: float | None = None, count: int | None = None
    ) -> int:
        """Deliver events (after :meth:`subscribe_events`) until ``duration`` or ``count``; returns how many."""
        deadline = None if duration is None else time.monotonic() + duration
        seen = 0
        while count is None or seen < count:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if deadline is not None and wait <= 0:
                break
            event = self.next_event(wait)
            if event is not None:
                seen += 1
                on_event(event)
        return seen

    def retained_version(self, group: str, wait: float = 1.0) -> int | None:
        """The version of the group's retained layer on the broker (None: none, or unreadable)."""
        topic = self._topics(self.console_id).fleet_policy(group)
        self.client.subscribe(topic)
        try:
            deadline = time.monotonic() + wait
            while (remaining := deadline - time.monotonic()) > 0:
                got = self.client.next_message(remaining)
                if got is None:
                    return None
                if got[0] != topic:
                    continue  # nothing else is subscribed yet; be safe anyway
                try:
                    body = json.loads(self.codec.decode(got[1]).body or b"null")
                except (PayloadError, ValueError):
                    return None
                return claimed_version(body)
            return None
        finally:
            self.client.unsubscribe(topic)

    def publish_layer(self, group: str, body: Mapping[str, Any]) -> str:
        """Publish ``body`` (a layer document or a signed envelope) as the group's retained layer."""
        topic = self._topics(self.console_id).fleet_policy(group)
        payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        message = KuraMessage(timestamp_ms=int(time.time() * 1000), body=payload)
        self.client.publish(topic, self.codec.encode(message), qos=1, retain=True)
        return topic

    def rollout(
        self,
        tracker: RolloutTracker,
        body: Mapping[str, Any],
        *,
        timeout: float,
        registry: DeviceRegistry | None = None,
        on_progress: Callable[[RolloutTracker, Event | None], None] | None = None,
    ) -> RolloutTracker:
        """Publish the layer and collect acknowledgements until ``tracker.complete()`` or ``timeout``."""
        self.subscribe_events(telemetry=("policy",))
        self.publish_layer(tracker.group, body)
        tracker.begin()
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0 and not tracker.complete():
            event = self.next_event(min(0.2, remaining))
            if event is None:
                continue
            if registry is not None:
                registry.observe(event)
            if tracker.observe(event) and on_progress is not None:
                on_progress(tracker, event)
        if any(
            r.status == "rejected" and r.reason.startswith("policy-rollback") for r in tracker.rows.values()
        ):
            # devices hold a newer version: left retained, this layer would reach every device that joins
            # later as the group's policy, older than what the fleet runs
            self.withdraw_layer(tracker.group)
            tracker.withdrawn = True
        return tracker

    def withdraw_layer(self, group: str) -> None:
        """Remove the group's retained layer from the broker (an empty retained message)."""
        topic = self._topics(self.console_id).fleet_policy(group)
        self.client.publish(topic, b"", qos=1, retain=True)
