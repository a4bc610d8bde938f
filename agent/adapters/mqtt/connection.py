"""The one adapter over paho-mqtt 2.x: a Kura-style device connection.

What it does on every (re)connect, from paho's network thread: (re)subscribe (QoS as given, one
``message_callback_add`` per subscription), publish the birth certificate, then run the ``on_connected``
hooks.
Subscribing before the birth means that once a console sees the birth, requests reach us.
(Kura publishes the birth first; with persistent sessions the difference is invisible.)

Reconnects are paho's own (``loop_start`` thread), but each wait is set from :class:`Backoff`: exponential
between ``reconnect_min_seconds`` and ``reconnect_max_seconds`` with jitter, so a fleet does not reconnect
in lock-step after a broker restart. The birth is retained and the will clears it (an empty retained message
on ``$EDC/{account}/{device}/MQTT/BIRTH``, which live subscribers see as the device gone, as Kura's LWT says),
so that the retained births always name the devices online now; :meth:`MqttConnection.stop` publishes
MQTT/DC, clears the birth and disconnects cleanly, so the broker discards the will.

Inbound messages run on a small thread pool (Kura uses two threads) so a slow handler never stalls keepalive;
when the pool is saturated the network thread waits, which pushes back on the broker instead of queueing
without bound. Publishing returns a :class:`PublishHandle` that completes when the broker acknowledged
(PUBACK for QoS 1) - the telemetry outbox deletes a row only then. At most ``max_in_flight`` QoS>0 publishes
may be outstanding; more raise :class:`~agent.errors.PublishWindowFull`.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.kurapayload import KuraMessage
from agent.adapters.mqtt.topics import Topics
from agent.config import MqttConfig
from agent.errors import BrokerError, ConfigError, PublishWindowFull
from agent.logs import Quiet

log = logging.getLogger(__name__)


class _PahoLogger(logging.Logger):
    """paho's own log: every record at DEBUG, whatever level the library gives it (internal chatter)."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


_paho_log = _PahoLogger("agent.adapters.mqtt.paho")
_paho_log.parent = log

#: MQTT 5 session expiry for a persistent session: queued QoS 1 requests survive a week offline
SESSION_EXPIRY_SECONDS = 7 * 24 * 3600
#: paho's own send window; brokers commonly advertise a receive maximum of 20
_WIRE_IN_FLIGHT = 20


class Backoff:
    """Jittered exponential backoff: attempt n waits in [cap/2, cap], cap = min(max, min * 2**n), and never
    less than ``minimum``."""

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        if minimum <= 0 or maximum < minimum:
            raise ValueError("backoff needs 0 < minimum <= maximum")
        self.minimum, self.maximum = minimum, maximum
        self._rng = rng or random.Random()
        self._attempt = 0

    def next(self) -> float:
        cap = min(self.maximum, self.minimum * 2.0 ** min(self._attempt, 62))
        self._attempt += 1
        return max(self.minimum, cap / 2 + self._rng.uniform(0, cap / 2))

    def reset(self) -> None:
        self._attempt = 0


@dataclass(frozen=True)
class Subscription:
    """``handler(topic, payload)`` runs on the connection's worker pool; its exceptions are logged."""

    topic_filter: str
    qos: int
    handler: Callable[[str, bytes], None]


class PublishHandle:
    """Completes when the broker acknowledged the publish (``acked``), or when it cannot be (``error``)."""

    def __init__(self, topic: str, qos: int) -> None:
        self.topic = topic
        self.qos = qos
        self.mid: int | None = None
        self.acked = False
        self.error: str | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable[[PublishHandle], None]] = []
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """True iff the broker acknowledged within ``timeout``."""
        self._done.wait(timeout)
        return self.acked

    def add_done_callback(self, fn: Callable[[PublishHandle], None]) -> None:
        """``fn(handle)`` runs once, on paho's thread (or now, if already done); keep it short."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        _run_callback(fn, self)

    def _resolve(self, acked: bool, error: str | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.acked, self.error = acked, error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            _run_callback(fn, self)

    def __repr__(self) -> str:
        state = "acked" if self.acked else (self.error or "pending")
        return f"<PublishHandle {self.topic} qos={self.qos} mid={self.mid} {state}>"


def _run_callback(fn: Callable[[PublishHandle], None], handle: PublishHandle) -> None:
    try:
        fn(handle)
    except Exception:
        log.exception("publish callback for %s failed", handle.topic)


def _set_reconnect_delay(client: paho.Client, seconds: float) -> None:
    # paho annotates the delays as int but only does time arithmetic with them; floats keep the jitter.
    # Setting min == max makes paho's next wait exactly ours (it resets its own doubling).
    client.reconnect_delay_set(cast(int, seconds), cast(int, seconds))


def read_secret(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"mqtt: cannot read password_file {path}: {exc.strerror}") from None


def broker_address(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"mqtt: url {url!r} must look like mqtt://host[:port] or mqtts://host[:port]")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"mqtt: url {url!r} has an invalid port") from None
    return parts.hostname, port, tls


def apply_credentials(client: paho.Client, cfg: MqttConfig) -> None:
    """Username/password and TLS material of ``cfg`` on a paho client: the one place both the device's
    connection and the console set them. Raises ConfigError naming the setting that cannot be used."""
    if cfg.username is not None:
        password = read_secret(cfg.password_file) if cfg.password_file is not None else None
        client.username_pw_set(cfg.username, password)
    elif cfg.password_file is not None:
        raise ConfigError("mqtt: password_file is set but username is not")
    if broker_address(cfg.url)[2]:
        for what, path in (("ca_bundle", cfg.ca_bundle), ("client_cert", cfg.client_cert)):
            if path is not None and not path.is_file():
                raise ConfigError(f"mqtt: {what} {path} is not a readable file")
        if (cfg.client_cert is None) != (cfg.client_key is None):
            raise ConfigError("mqtt: client_cert and client_key must be given together")
        try:
            client.tls_set(
                ca_certs=str(cfg.ca_bundle) if cfg.ca_bundle else None,
                certfile=str(cfg.client_cert) if cfg.client_cert else None,
                keyfile=str(cfg.client_key) if cfg.client_key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"mqtt: TLS material cannot be used: {exc}") from None
    elif cfg.ca_bundle or cfg.client_cert:
        raise ConfigError("mqtt: ca_bundle / client_cert need an mqtts:// url")


class MqttConnection:
    """A device's connection to its broker. Create it only when ``mqtt`` is configured."""

    def __init__(
        self,
        config: MqttConfig,
        topics: Topics,
        *,
        subscriptions: Sequence[Subscription],
        birth: Callable[[], KuraMessage],
        disconnect: Callable[[], KuraMessage],
        codec: PayloadCodec | None = None,
        max_in_flight: int = 100,
        handler_threads: int = 2,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.topics = topics
        self.codec = codec or PayloadCodec.from_config(config)
        self._subscriptions = tuple(subscriptions)
        self._birth = birth
        self._disconnect = disconnect
        self._max_in_flight = max_in_flight
        self._host, self._port, self._tls = broker_address(config.url)
        self._backoff = Backoff(config.reconnect_min_seconds, config.reconnect_max_seconds, rng)
        #: a broker that stays away is logged once, then every few minutes with a count
        self._quiet = Quiet(log)
        self._lock = threading.Lock()
        self._state = "new"  # new -> running -> stopping -> stopped
        self._connected = threading.Event()
        self._pending: dict[int, PublishHandle] = {}
        self._early: dict[int, ReasonCode] = {}  # acks that arrived before publish() recorded the mid
        self._bounded = 0
        self._hooks: list[Callable[[], None]] = []
        self._workers = ThreadPoolExecutor(max_workers=handler_threads, thread_name_prefix="mqtt-handler")
        self._slots = threading.BoundedSemaphore(handler_threads * 16)
        self.connect_count = 0
        self._client = self._make_client()

    # --- setup -------------------------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        cfg = self.config
        v5 = cfg.protocol == "5"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.topics.device_id,
            clean_session=None if v5 else cfg.clean_session,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        )
        apply_credentials(client, cfg)
        # the birth is retained, so that a console that starts later finds every device online now; the will
        # clears it (an empty retained message, which live subscribers receive as "gone", like an LWT)
        client.will_set(self.topics.lifecycle("BIRTH"), payload=b"", qos=1, retain=True)
        client.max_inflight_messages_set(max(1, min(self._max_in_flight, _WIRE_IN_FLIGHT)))
        # paho's own messages (a refused socket on every retry) are library-internal: DEBUG, whatever it calls
        # them; the connection's outcome is logged by this adapter, once (agent/logs.py Quiet)
        client.enable_logger(_paho_log)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_unexpected_message
        for sub in self._subscriptions:
            client.message_callback_add(sub.topic_filter, self._deliver_to(sub))
        _set_reconnect_delay(client, self.config.reconnect_min_seconds)
        return client

    def _set_delay(self, seconds: float) -> None:
        _set_reconnect_delay(self._client, seconds)

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; returns at once. Reconnects forever until :meth:`stop`."""
        with self._lock:
            if self._state != "new":
                raise BrokerError(f"mqtt connection cannot start: it is {self._state}")
            self._state = "running"
        kwargs: dict[str, Any] = {}
        if self.config.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if self.config.clean_session else SESSION_EXPIRY_SECONDS
            kwargs = {"clean_start": self.config.clean_session, "properties": props}
        self._client.connect_async(self._host, self._port, keepalive=self.config.keepalive_seconds, **kwargs)
        self._client.loop_start()
        log.info("mqtt: connecting to %s:%d as %s", self._host, self._port, self.topics.device_id)

    def stop(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` for outstanding acks, publish MQTT/DC, disconnect cleanly (no LWT)."""
        with self._lock:
            if self._state != "running":
                self._state = "stopped"
                return
            self._state = "stopping"
        if self._connected.is_set():
            deadline = time.monotonic() + timeout
            with self._lock:
                outstanding = list(self._pending.values())
            for handle in outstanding:  # Kura's quiesce: let in-flight publishes complete first
                handle.wait(max(0.0, deadline - time.monotonic()))
            try:
                dc = self._publish(
                    self.topics.lifecycle("DC"), self._encode(self._disconnect()), 0, False, False
                )
                gone = self._publish(
                    self.topics.lifecycle("BIRTH"), b"", 1, True, False
                )  # not online any more
                dc.wait(max(0.5, deadline - time.monotonic()))
                gone.wait(max(0.5, deadline - time.monotonic()))
            except BrokerError as exc:
                log.warning("mqtt: disconnect certificate not sent: %s", exc)
        self._client.disconnect()
        self._client.loop_stop()
        self._workers.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._state = "stopped"
            pending, self._pending = self._pending, {}
        self._connected.clear()
        for handle in pending.values():
            handle._resolve(False, "connection stopped before the broker acknowledged")
        log.info("mqtt: disconnected")

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._connected.wait(timeout)

    def add_on_connected(self, hook: Callable[[], None]) -> None:
        """``hook()`` runs on paho's thread after each successful connect (after subscribe + birth)."""
        self._hooks.append(hook)

    @property
    def in_flight(self) -> int:
        """Outstanding QoS>0 publishes made through :meth:`publish`."""
        with self._lock:
            return self._bounded

    # --- publishing ----------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> PublishHandle:
        """Queue a publish; while offline QoS>0 messages wait in paho and go out after reconnect.

        Raises PublishWindowFull when ``max_in_flight`` QoS>0 publishes are unacknowledged, BrokerError when
        the connection is not running or the topic/payload is invalid.
        """
        return self._publish(topic, payload, qos, retain, qos > 0)

    def publish_message(self, topic: str, message: KuraMessage, qos: int = 1) -> PublishHandle:
        return self.publish(topic, self._encode(message), qos)

    def _encode(self, message: KuraMessage) -> bytes:
        return self.codec.encode(message)

    def publish_birth(self) -> None:
        """Publish the retained birth again because what it says changed (policy versions): the retained
        births stay a true picture of the devices online, for a console that starts later. Kura sends
        MQTT/APPS on such changes; this is the retained equivalent."""
        if not self.is_connected:
            return  # the next connect publishes it anyway
        try:
            self._publish(self.topics.lifecycle("BIRTH"), self._encode(self._birth()), 1, True, False)
        except BrokerError as exc:
            log.debug("mqtt: birth not republished: %s", exc)

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool, bounded: bool) -> PublishHandle:
        if qos not in (0, 1, 2):
            raise BrokerError(f"invalid QoS {qos}")
        with self._lock:
            if self._state not in ("running", "stopping"):
                raise BrokerError(f"mqtt connection is {self._state}; cannot publish to {topic}")
            if bounded and self._bounded >= self._max_in_flight:
                raise PublishWindowFull(
                    f"{self._bounded} publishes await the broker's acknowledgement; retry when some complete"
                )
            if bounded:
                self._bounded += 1
        handle = PublishHandle(topic, qos)
        if bounded:
            handle.add_done_callback(self._release_slot)
        try:
            info = self._client.publish(topic, payload, qos, retain)
        except ValueError as exc:  # invalid topic, payload over MQTT's limit
            handle._resolve(False, str(exc))
            raise BrokerError(f"cannot publish to {topic!r}: {exc}") from None
        handle.mid = info.mid
        rc = info.rc
        with self._lock:
            early = self._early.pop(info.mid, None)
            # QoS>0 while offline stays queued in paho and is sent after the reconnect
            accepted = rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
                rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0
            )
            if accepted and early is None:
                self._pending[info.mid] = handle
        if not accepted:
            handle._resolve(False, paho.error_string(rc))
        elif early is not None:
            handle._resolve(not early.is_failure, str(early) if early.is_failure else None)
        return handle

    def _release_slot(self, _handle: PublishHandle) -> None:
        with self._lock:
            self._bounded -= 1

    # --- paho callbacks (network thread) -------------------------------------------------------------

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, reason: ReasonCode, _p: Properties) -> None:
        with self._lock:
            handle = self._pending.pop(mid, None)
            if handle is None:
                self._early[mid] = reason
                return
        if reason.is_failure:
            log.warning("mqtt: broker refused publish to %s: %s", handle.topic, reason)
            handle._resolve(False, str(reason))
        else:
            handle._resolve(True)

    def _on_connect(self, client: paho.Client, _u: Any, flags: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            self._quiet.log(
                logging.ERROR, f"refused {reason}", "mqtt: broker refused the connection: %s", reason
            )
            return
        self._quiet.ok("mqtt: the broker answers again")
        self.connect_count += 1
        self._backoff.reset()
        self._set_delay(self.config.reconnect_min_seconds)
        log.info("mqtt: connected (session present: %s)", getattr(flags, "session_present", "?"))
        if self._subscriptions:
            client.subscribe([(s.topic_filter, s.qos) for s in self._subscriptions])
        self._connected.set()
        try:
            self._publish(self.topics.lifecycle("BIRTH"), self._encode(self._birth()), 1, True, False)
        except Exception:
            log.exception("mqtt: birth certificate not published")
        for hook in list(self._hooks):
            try:
                hook()
            except Exception:
                log.exception("mqtt: on_connected hook failed")

    def _on_connect_fail(self, _c: paho.Client, _u: Any) -> None:
        delay = self._backoff.next()
        self._quiet.log(
            logging.WARNING,
            "unreachable",
            "mqtt: cannot reach %s:%d; retrying in %.1fs",
            self._host,
            self._port,
            delay,
        )
        self._set_delay(delay)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._connected.clear()
        if self._state == "running":
            delay = self._backoff.next()
            log.warning("mqtt: connection lost (%s); reconnecting in %.1fs", reason, delay)
            self._set_delay(delay)

    def _on_subscribe(self, _c: paho.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        for sub, reason in zip(self._subscriptions, reasons, strict=False):
            if reason.is_failure:
                log.error("mqtt: broker refused subscription %s: %s", sub.topic_filter, reason)

    def _on_unexpected_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        log.debug("mqtt: ignoring message on %s", msg.topic)

    def _deliver_to(self, sub: Subscription) -> Callable[[paho.Client, Any, paho.MQTTMessage], None]:
        def deliver(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            topic, payload = msg.topic, bytes(msg.payload)
            self._slots.acquire()  # back-pressure: the network thread waits when handlers are saturated
            try:
                self._workers.submit(self._run_handler, sub, topic, payload)
            except RuntimeError:  # pool shut down: we are stopping
                self._slots.release()

        return deliver

    def _run_handler(self, sub: Subscription, topic: str, payload: bytes) -> None:
        try:
            sub.handler(topic, payload)
        except Exception:
            log.exception("mqtt: handler for %s failed", topic)
        finally:
            self._slots.release()


def device_subscriptions(
    topics: Topics,
    groups: Sequence[str],
    on_control: Callable[[str, bytes], None],
    on_fleet: Callable[[str, str, bytes], None],
) -> list[Subscription]:
    """The agent's subscriptions, all QoS 1: its own control topics (requests for the dispatcher) and the
    fleet policy topic of each group (``on_fleet(group, topic, payload)``)."""
    subs = [Subscription(topics.control_filter, 1, on_control)]
    for group in groups:

        def fleet(topic: str, payload: bytes, group: str = group) -> None:
            on_fleet(group, topic, payload)

        subs.append(Subscription(topics.fleet_policy(group), 1, fleet))
    return subs
