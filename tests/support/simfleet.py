"""Simulated devices that speak the real device protocol, built from the agent's own MQTT and policy code:
the birth certificate (agent.adapters.mqtt.birth), the will that clears it, the request dispatcher
(agent.adapters.mqtt.requests.Dispatcher), the policy gate and layer parser (agent.control.gate,
agent.core.policy), acknowledgements and alerts as the outbox publishes them
(agent.runtime.outbox.telemetry_message, with the outbox sequence). What they do not have is an engine:
they hold policy in memory and answer ``PUT fleet/{group}``, ``EXEC policy/dry-run`` and ``GET status``.

Many devices share one process (one paho network thread each); the fleet benchmark runs several such
processes. Used by tests/integration/test_console_replicas.py and bench/fleet.py.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.adapters.mqtt.birth import AgentInfo, DeviceFacts, birth_message
from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.requests import Dispatcher, Request, Response
from agent.adapters.mqtt.topics import Topics
from agent.control.gate import PolicyGate
from agent.core.policy import group_layer
from agent.core.records import (
    DecisionRecord,
    OutboxMessage,
    decision_telemetry,
    new_id,
    policy_event,
    utc_now,
)
from agent.errors import Code, ControlError, ImageGuardError
from agent.runtime.outbox import telemetry_message

FACTS = DeviceFacts(
    model_name="sim",
    model_id="sim",
    serial_number="0",
    firmware_version="0",
    bios_version="0",
    cpu_version="0",
    os="Linux",
    os_version="6",
    os_arch="x86_64",
    runtime_name="CPython",
    runtime_version="3.11",
    available_processors=1,
    total_memory_kb=1024,
    interfaces=(),
)


class SimDevice:
    def __init__(self, host: str, port: int, account: str, device: str, groups: Iterable[str]) -> None:
        self.device = device
        self.groups = tuple(groups)
        self.topics = Topics(account, device)
        self.codec = PayloadCodec()
        self.gate = PolicyGate(device, None, allow_unsigned=True)
        self.versions: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self.host, self.port = host, port
        routes = {
            ("PUT", ("fleet", "{group}")): self._put_fleet,
            ("EXEC", ("policy", "dry-run")): self._dry_run,
            ("GET", ("status",)): self._status,
        }
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device, clean_session=True)
        self.dispatcher = Dispatcher(self.topics, routes, lambda t, p: self.client.publish(t, p, qos=0))
        self.client.will_set(self.topics.lifecycle("BIRTH"), payload=b"", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.connected = threading.Event()

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=60)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _birth(self) -> bytes:
        info = AgentInfo(
            self.device,
            groups=self.groups,
            policy_version=str(max(self.versions.values(), default=0)),
            payload_encoding=self.codec.birth_name,
            extra={
                "policy_layers": ",".join(f"{k}={v}" for k, v in sorted(self.versions.items())),
                "enforcement": "enforce",
                "outbox_dropped": "0",
            },
        )
        now = int(time.time() * 1000)
        return self.codec.encode(birth_message(FACTS, info, uptime_ms=1000, now_ms=now))

    def _on_connect(self, c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        c.subscribe(f"{self.topics.control_base}/#", qos=1)
        c.publish(self.topics.lifecycle("BIRTH"), self._birth(), qos=1, retain=True)
        self.connected.set()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        self.dispatcher.handle(msg.topic, bytes(msg.payload))

    # --- telemetry -----------------------------------------------------------------------------

    def publish(self, out: OutboxMessage) -> paho.MQTTMessageInfo:
        with self._lock:
            seq = next(self._seq)
        payload = self.codec.encode(telemetry_message(out.message, seq))
        return self.client.publish(self.topics.data(out.kind), payload, qos=1)  # type: ignore[arg-type]

    def blocked(self, image: str = "untrusted:1", name: str = "rogue") -> str:
        """A container blocked as the agent records it: a verdict and an alert; returns the alert's id."""
        record = DecisionRecord(
            id=new_id(),
            time=utc_now(),
            device=self.device,
            container_id=new_id() + new_id()[:32],
            container_name=name,
            image=image,
            image_id=None,
            digests=(),
            verdict="blocked",
            reason=Code.NOT_ALLOWLISTED,
            detail="no allowlist entry and no trust anchor covers the image",
            policy_version=max(self.versions.values(), default=0),
            policy_layers=tuple(sorted(self.versions.items())),
            mode="enforce",
            trigger="event",
            action="removed",
        )
        verdict, alert = decision_telemetry(record)
        self.publish(verdict)
        self.publish(alert)
        return str(alert.message["id"])

    # --- the control resources -------------------------------------------------------------------

    def _put_fleet(self, req: Request) -> Response:
        group = req.params["group"]
        if group not in self.groups:
            raise ControlError(404, f"group {group!r} is not one of this device's groups")
        layer_name = group_layer(group)
        try:
            layer = self.gate.accept(req.require_json(), layer_name)
        except ImageGuardError as exc:
            self._ack(layer_name, None, "rejected", exc)
            raise
        held = self.versions.get(layer_name, 0)
        if layer.version < held:
            exc = ControlError(400, f"version {layer.version} is older than the held version {held}")
            self._ack(layer_name, layer.version, "rejected", exc)
            raise exc
        status = "unchanged" if layer.version == held else "applied"
        self.versions[layer_name] = layer.version
        self._ack(layer_name, layer.version, status)
        return Response.of_json(
            {"layer": layer_name, "version": layer.version, "status": status, "revoked": 0}
        )

    def _ack(self, layer: str, version: int | None, status: str, exc: ImageGuardError | None = None) -> None:
        self.publish(
            policy_event(
                device=self.device,
                layer=layer,
                version=version if version is not None else -1,
                status=status,
                policy_version=max(self.versions.values(), default=0),
                source="mqtt:console",
                reason=str(exc.code) if exc is not None else None,
                detail=exc.message if exc is not None else None,
            )
        )

    def _dry_run(self, req: Request) -> Response:
        doc = req.require_json()
        layer = self.gate.accept(doc["document"], doc.get("layer", "device"))
        held = self.versions.get(layer.name, 0)
        status = "newer" if layer.version > held else "unchanged" if layer.version == held else "older"
        return Response.of_json(
            {
                "layer": layer.name,
                "version": layer.version,
                "held_version": held,
                "version_status": status,
                "running": 0,
                "would_block": 0,
                "containers": [],
            }
        )

    def _status(self, _req: Request) -> Response:
        return Response.of_json(
            {"device": self.device, "groups": list(self.groups), "versions": self.versions}
        )


def start_fleet(
    host: str, port: int, account: str, names: Iterable[str], groups: Iterable[str], timeout: float = 60
) -> list[SimDevice]:
    devices = [SimDevice(host, port, account, n, groups) for n in names]
    for d in devices:
        d.start()
    deadline = time.monotonic() + timeout
    for d in devices:
        if not d.connected.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"simulated device {d.device} did not connect within {timeout:g}s")
    return devices
