"""The CONTAINER-AUTH-V1 request handler in process: Dispatcher + agent.control.resources routes + a real Service on a
temp Store, with an unreachable engine. Requests go in as KuraPayloads, replies come back decoded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.adapters.engine import Engine
from agent.adapters.mqtt.codec import PayloadCodec
from agent.adapters.mqtt.kurapayload import KuraMessage, MetricValue, encode_protobuf
from agent.adapters.mqtt.requests import Dispatcher
from agent.adapters.mqtt.topics import Topics
from agent.adapters.store import Store
from agent.config import Config, from_dict
from agent.control.resources import ControlContext, routes
from agent.control.service import Service
from agent.core.schemas import validate
from tests.support.keys import public_pem

T = Topics(account="acme", device_id="dev-1")


class Harness:
    def __init__(self, tmp: Path, *, signing_key: bool = False, unsigned: bool = True) -> None:
        mqtt: dict[str, Any] = {"url": "mqtt://127.0.0.1:1", "account": "acme"}
        if unsigned and not signing_key:  # these tests are about resources, not about the signing default
            mqtt["allow_unsigned_policy"] = True
        if signing_key:
            (tmp / "policy.pub").write_text(public_pem())
            mqtt["policy_signing_key"] = str(tmp / "policy.pub")
        self.config: Config = from_dict(
            {
                "device": {"id": "dev-1", "groups": ["g1"]},
                "state": {"dir": str(tmp / "state")},
                "enforcement": {
                    "mode": "enforce"
                },  # not a first run's audit: these tests are about resources
                "mqtt": mqtt,
            },
            base=tmp,
        )
        self.store = Store(self.config.state_dir)
        self.changes = 0
        self.service = Service(self.config, self.store, telemetry=True, on_change=self._changed)
        engine = Engine("unix:///nonexistent/docker.sock", 0.5)
        self.ctx = ControlContext(self.config, self.service, engine)
        self.sent: list[tuple[str, bytes]] = []
        self.dispatcher = Dispatcher(T, routes(self.ctx), lambda t, p: self.sent.append((t, p)))
        self.codec = PayloadCodec()
        self._rid = 0

    def _changed(self) -> None:
        self.changes += 1

    def call(
        self, method: str, *resource: str, body: Any = None, raw: bytes | None = None, proto: bool = False
    ) -> tuple[int, str | None, Any]:
        self._rid += 1
        rid = str(self._rid)
        metrics = {
            "request.id": MetricValue.string(rid),
            "requester.client.id": MetricValue.string("console"),
        }
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        msg = KuraMessage(timestamp_ms=1, metrics=metrics, body=data)
        payload = encode_protobuf(msg) if proto else self.codec.encode(msg, "json")
        before = len(self.sent)
        self.dispatcher.handle(T.request(method, *resource), payload)
        assert len(self.sent) == before + 1, "exactly one reply"
        topic, reply_payload = self.sent[-1]
        assert topic == T.reply("console", rid)
        reply = self.codec.decode(reply_payload)
        code = reply.integer("response.code")
        assert code is not None
        doc = json.loads(reply.body) if reply.body else None
        return code, reply.string("response.exception.message"), doc

    def ok(self, schema: str, method: str, *resource: str, body: Any = None) -> Any:
        code, message, doc = self.call(method, *resource, body=body)
        assert code == 200, message
        validate(doc, f"control/{schema}", f"{method} {'/'.join(resource)} reply")
        return doc

    def state(self) -> list[dict[str, Any]]:
        return [lyr.to_document() for lyr in self.store.layers()]

    def policy_events(self) -> list[dict[str, Any]]:
        return [m.message for m in self.store.outbox_peek(1000) if m.kind == "policy"]
