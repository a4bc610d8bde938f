"""The agent's cloud side: one MQTT connection carrying control requests, telemetry and fleet policy layers.

Built by the composition root (agent/app.py) only when ``[mqtt]`` is configured, from:

* :class:`~agent.adapters.mqtt.connection.MqttConnection` (birth on every connect, MQTT/DC on a clean stop, LWT);
* :class:`~agent.adapters.mqtt.requests.Dispatcher` with the resources of :mod:`agent.control.resources` (replies at QoS 0);
* :class:`~agent.runtime.outbox.OutboxDrainer` (verdicts, alerts, policy acknowledgements: QoS 1, at least once);
* the fleet subscription of each configured group: a retained layer document on
  ``$EDC/{account}/fleet/{group}/CONTAINER-AUTH-V1/policy`` becomes the ``group:{group}`` layer when its
  version is newer; equal is "unchanged", older is refused; every outcome is acknowledged on the device's
  ``.../policy`` telemetry (by :class:`~agent.control.service.Service`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from agent.adapters.mqtt.birth import (
    AgentInfo,
    DeviceFacts,
    birth_message,
    disconnect_message,
    gather_device_facts,
    read_uptime_ms,
)
from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.connection import MqttConnection
from agent.adapters.mqtt.kurapayload import KuraMessage
from agent.adapters.mqtt.requests import Dispatcher
from agent.adapters.mqtt.topics import Topics
from agent.config import Config
from agent.control.resources import ControlContext, accept_layer_document
from agent.control.service import Service
from agent.core.envelope import claimed_version
from agent.core.policy import group_layer
from agent.errors import BrokerError, ImageGuardError, InputError, PayloadError
from agent.runtime.outbox import DROPPED, OutboxDrainer

log = logging.getLogger(__name__)

FLEET_REJECTED = "fleet_rejected"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _no_constant(word: str) -> Any:
    raise ValueError(f"{word} is not JSON")


class CloudConnection:
    """The cloud side's behaviour: birth facts, replies, fleet layers, status. Its parts (the MQTT
    connection, the request dispatcher, the outbox drainer) are built by the composition root, which hands
    them over with :meth:`attach` (they need this object's callbacks, so it exists first)."""

    connection: MqttConnection
    dispatcher: Dispatcher
    drainer: OutboxDrainer

    def __init__(
        self,
        config: Config,
        service: Service,
        ctx: ControlContext,
        codec: PayloadCodec,
        topics: Topics,
        *,
        facts: DeviceFacts | None = None,
    ) -> None:
        self.config = config
        self.service = service
        self.ctx = ctx
        self.codec = codec
        self.topics = topics
        self._facts = facts if facts is not None else gather_device_facts()
        ctx.connection_status = self.status

    def attach(self, connection: MqttConnection, dispatcher: Dispatcher, drainer: OutboxDrainer) -> None:
        self.connection = connection
        self.dispatcher = dispatcher
        self.drainer = drainer
        connection.add_on_connected(drainer.wake)
        self.service.store.add_outbox_listener(drainer.wake)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.drainer.start()
        self.connection.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop publishing new telemetry, let in-flight messages be acknowledged, send MQTT/DC, disconnect."""
        self.drainer.stop(timeout)
        self.connection.stop(timeout)
        self.drainer.flush()  # acknowledgements that arrived while the connection quiesced

    def status(self) -> dict[str, Any]:
        stats = self.dispatcher.stats
        return {
            "connected": self.connection.is_connected,
            "url": self.config.mqtt.url if self.config.mqtt else None,
            "account": self.topics.account,
            "encoding": self.codec.encoding,
            "connects": self.connection.connect_count,
            "requests": {
                "received": stats.received,
                "replied": stats.replied,
                "dropped": stats.dropped,
                "errors": stats.errors,
            },
            "telemetry": self.drainer.status(),
        }

    # --- lifecycle certificates ------------------------------------------------------------------

    def _info(self) -> AgentInfo:
        policy = self.service.effective()
        counters = self.service.store.counters()
        dropped = sum(v for k, v in counters.items() if k.startswith(DROPPED))
        return AgentInfo(
            self.config.device.display_name,
            groups=self.config.device.groups,
            policy_version=str(policy.version),
            payload_encoding=self.codec.birth_name,
            extra={
                "policy_layers": ",".join(f"{k}={v}" for k, v in sorted(policy.versions.items())),
                "enforcement": policy.enforcement.mode if policy.enforcement.enabled else "disabled",
                "outbox_queued": str(self.service.store.outbox_size()),
                "outbox_dropped": str(dropped),
                # records enforcement made but could not store (agent/runtime/recorder.py)
                "records_lost": str(sum(v for k, v in counters.items() if k.startswith("records_lost."))),
                "state_storage": "read-only" if self.service.store.read_only else "ok",
                # enforcement that had to be retried (agent/runtime/enforcer.py): never silent
                "enforcement_retries": str(counters.get("retries", 0)),
                "enforcement_failures": str(
                    sum(
                        counters.get(k, 0)
                        for k in ("engine_errors", "removal_failures", "enforcement_errors")
                    )
                ),
            },
        )

    def birth(self) -> KuraMessage:
        return birth_message(self._facts, self._info(), uptime_ms=read_uptime_ms(), now_ms=_now_ms())

    def disconnect(self) -> KuraMessage:
        return disconnect_message(self._info(), uptime_ms=read_uptime_ms(), now_ms=_now_ms())

    def reply(self, topic: str, payload: bytes) -> None:
        try:
            self.connection.publish(topic, payload, qos=0)
        except BrokerError as exc:
            log.warning("control: reply on %s not sent: %s", topic, exc)

    # --- fleet policy layers ---------------------------------------------------------------------

    def on_fleet_policy(self, group: str, topic: str, payload: bytes) -> None:
        """Apply a group's layer if newer; every outcome is acknowledged on ``.../policy``. Never raises."""
        layer = group_layer(group)
        source = f"fleet:{group}"
        if not payload:  # a cleared retained message: nothing to apply, keep what we hold
            log.info("fleet policy for group %s was cleared on the broker; keeping layer %s", group, layer)
            return
        doc: Any = None
        try:
            message = self.codec.decode(payload)
            if not message.body:
                raise PayloadError("the fleet policy message has no body; it must carry the layer document")
            try:
                doc = json.loads(message.body.decode("utf-8"), parse_constant=_no_constant)
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise InputError(f"the fleet policy body is not JSON: {str(exc)[:200]}") from None
            parsed = accept_layer_document(self.ctx, doc, layer, source)
        except ImageGuardError as exc:
            self.service.store.bump(FLEET_REJECTED)
            self.service.record_rejection(layer, claimed_version(doc), exc, source)
            return
        except Exception:
            log.exception("fleet policy for group %s: unexpected failure", group)
            return
        try:
            result = self.service.apply_layer(parsed, source=source)  # records its own ack or rejection
        except ImageGuardError:
            return
        except Exception:
            log.exception("fleet policy for group %s: unexpected failure", group)
            return
        log.info("fleet policy layer %s version %d: %s", layer, result.version, result.status)
