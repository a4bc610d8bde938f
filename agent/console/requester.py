"""Many Kura requests at once: the console service's request/response client.

``Console.request`` (agent/console/client.py) asks one device and waits; a rollout wave asks hundreds. This
client subscribes once to its own reply filter and matches replies to requests by ``request.id``, so every
request of a wave is in flight together and each caller waits on its own :class:`Future`.

Its requester id (the reply topic's client-id level) is ``{console id}-{replica}``: replicas never read each
other's replies.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.kurapayload import KuraMessage, MetricValue
from agent.adapters.mqtt.requests import REQUEST_ID, REQUESTER, RESPONSE_CODE, RESPONSE_MESSAGE
from agent.adapters.mqtt.topics import Topics
from agent.config import MqttConfig
from agent.console.client import ConsoleClient, Reply, _levels
from agent.errors import BrokerError, InputError, PayloadError

log = logging.getLogger(__name__)


class Requester:
    """Request/response over one MQTT connection; thread-safe."""

    def __init__(self, mqtt: MqttConfig, requester_id: str) -> None:
        self.requester_id = requester_id
        self.codec = PayloadCodec.from_config(mqtt)
        self.account, self.prefix = mqtt.account, mqtt.control_prefix
        self._own = Topics(self.account, requester_id, control_prefix=self.prefix)
        #: request id -> (future, deadline on the monotonic clock, what to say when it passes)
        self._pending: dict[str, tuple[Future[Reply], float, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # one thread expires every overdue request (a timer per request would be a thread per device)
        self._reaper = threading.Thread(target=self._expire_loop, name="console-requests", daemon=True)
        self.client = ConsoleClient(mqtt, requester_id, on_message=self._on_message)

    def start(self) -> None:
        self.client.connect()
        self.client.subscribe(self._own.reply_filter(self.requester_id), qos=1)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut, _, _ in pending.values():
            fut.cancel()
        self.client.close()

    def request(
        self, device: str, method: str, resource: str, doc: Any = None, *, timeout: float = 10.0
    ) -> Future[Reply]:
        """Send a request; the Future gets the :class:`Reply`, or ``TimeoutError`` after ``timeout``."""
        try:
            topic = Topics(self.account, device, control_prefix=self.prefix).request(
                method.upper(), *_levels(resource)
            )
        except ValueError as exc:
            raise InputError(str(exc)) from None
        request_id = uuid.uuid4().hex
        fut: Future[Reply] = Future()
        label = f"no reply from {device} to {method.upper()} {resource} within {timeout:g}s"
        with self._lock:
            self._pending[request_id] = (fut, time.monotonic() + timeout, label)
        body = None if doc is None else json.dumps(doc, separators=(",", ":")).encode()
        metrics = {
            REQUEST_ID: MetricValue.string(request_id),
            REQUESTER: MetricValue.string(self.requester_id),
        }
        message = KuraMessage(timestamp_ms=int(time.time() * 1000), metrics=metrics, body=body)
        try:
            self.client.publish_nowait(topic, self.codec.encode(message), qos=1)
        except BrokerError as exc:
            self._settle(request_id, exc)
        return fut

    def ask(
        self, device: str, method: str, resource: str, doc: Any = None, *, timeout: float = 10.0
    ) -> Reply:
        """One request, waited for (raises TimeoutError or BrokerError)."""
        return self.request(device, method, resource, doc, timeout=timeout).result(timeout + 1)

    def _expire_loop(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic()
            with self._lock:
                overdue = [
                    (rid, label) for rid, (_, deadline, label) in self._pending.items() if deadline <= now
                ]
            for rid, label in overdue:
                self._settle(rid, TimeoutError(label))

    def _settle(self, request_id: str, outcome: Reply | BaseException) -> None:
        with self._lock:
            entry = self._pending.pop(request_id, None)
        if entry is None or entry[0].done():
            return
        fut = entry[0]
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)

    # paho's network thread
    def _on_message(self, topic: str, payload: bytes) -> None:
        request_id = topic.rsplit("/", 1)[-1]
        try:
            reply = self.codec.decode(payload)
        except PayloadError as exc:
            self._settle(request_id, BrokerError(f"undecodable reply on {topic}: {exc}"))
            return
        code = reply.integer(RESPONSE_CODE)
        if code is None:
            self._settle(request_id, BrokerError(f"the reply on {topic} has no {RESPONSE_CODE} metric"))
            return
        self._settle(request_id, Reply(code, reply.body, reply.string(RESPONSE_MESSAGE)))
